"""A/B of the service's CPU a request by role: tiny model, configs/local.yaml, 16 clients, 20 s."""
import json, os, subprocess, sys, time
import httpx
sys.path.insert(0, "/work/main")
from bench.cpu_usage import snapshot, per_request_ms
PY = "/work/main/.venv/bin/python"
MODEL = "/work/main/.cache/tiny-kosmos2"
W = ["--tasks", "caption:1", "--resolutions", "640x480:1", "--formats", "jpeg:1", "--max-tokens", "32", "--ignore-eos"]
def one(tree, label):
    subprocess.run(["/work/main/.venv/bin/ray", "stop", "--force"], capture_output=True)
    env = {**os.environ, "PYTHONPATH": tree, "HF_HUB_OFFLINE": "1"}
    svc = subprocess.Popen([PY, "-m", "serve", "run", "--model", MODEL, "--config", "configs/local.yaml", "--port", "8012"],
                           cwd=tree, env=env, stdout=open(f"/tmp/ab-{label}.log", "w"), stderr=subprocess.STDOUT)
    for _ in range(240):
        try:
            if httpx.get("http://127.0.0.1:8012/health", timeout=3).status_code == 200: break
        except httpx.HTTPError: pass
        time.sleep(1)
    out = f"/tmp/ab-{label}"
    before = snapshot()
    subprocess.run([PY, "-m", "bench", "run", "--url", "http://127.0.0.1:8012", "--concurrency", "16", "--duration", "20",
                    "--warmup-s", "3", "--grace", "10", "--no-progress", *W, "--out", out], cwd=tree, env=env, capture_output=True)
    after = snapshot()
    point = json.load(open(f"{out}/summary.json"))["points"][0]
    after.pop("load generator", None); before.pop("load generator", None)
    cpu = per_request_ms(before, after, point["sent"])
    svc.terminate(); svc.wait(timeout=60)
    subprocess.run(["/work/main/.venv/bin/ray", "stop", "--force"], capture_output=True)
    keep = {k: cpu[k] for k in ("Preprocessor", "Ingress", "Generator") if k in cpu}
    print(label, f"{point['images_per_s']:.1f} images/s", keep, flush=True)
for r in (1, 2):
    one("/tmp/basetree", f"base-{r}")
    one("/work/main", f"new-{r}")
