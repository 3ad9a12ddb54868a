"""The lab: tools that measure the engine and the service to guide their development, apart from the product's
``python -m bench`` commands. Each is its own command line:

- ``perf_run`` (``python -m bench.lab.perf_run``): the performance run, the engine paths side by side (at several
  output lengths if asked), then the service on the same machine, then where the fast engine's time goes; one
  ``perf.json`` (``perf_record``);
- ``engine_profile``: the fast engine's time by phase (vision, admission, decode), its top device kernels and
  the device's idle stretches;
- ``kernels``: the engine's memory-bound kernels against their alternatives at the real model's shapes;
- ``cpu_usage``: the CPU each of the service's processes spends, by role (for ``perf_run``);
- ``request_log``: where requests spent their time, from the Ingress's log lines;
- ``perf_gpu.sh``: the performance run and the CUDA tests on a GPU host, as one command;
- ``gpu_wheels.sh``: the wheels such a host lacks (Ray Serve and its dependencies), built where there is an
  index and installed there without one.
"""
