"""The add-on's Render on Farm: how long Blender's main thread is held, against the whole submission.

Usage::

    .venv/bin/python benchmarks/addon_submit.py [--texture-mib 200] [--repeat 3]

Starts `renderfarm up --agents 0` (nothing renders: this times the submission only), builds the
add-on with `renderfarm addon build`, and runs one Blender (the bpy module) that installs it,
logs in as the farm's first admin and saves a scene using a texture of ``--texture-mib`` MiB of
random bytes (a texture BAT must pack and the zip must carry). Each repeat then presses Render on
Farm the panel's way (``submit(asynchronous=True)``) and pumps the add-on's timer function every
10 ms, as Blender's event loop would, until the job is created. Printed per run: the seconds the
operator held the main thread (saving the copy), the longest single hold of the main thread
after it (the timer's work), and the whole submission (checks, BAT packing, zip, upload, job).
A texture changed between runs makes each upload new to the farm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

BLENDER_SCRIPT = r"""
import json, os, sys, time
import bpy
zip_path, server, password, work, mib, repeat = sys.argv[1:7]
bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
addon = sys.modules["bl_ext.user_default.render_farm"]
bpy.context.preferences.addons["bl_ext.user_default.render_farm"].preferences.server_url = server
bpy.ops.render_farm.login(username="admin", password=password)
bpy.ops.wm.read_homefile(use_empty=True)
scene = bpy.context.scene
cam = bpy.data.objects.new("Cam", bpy.data.cameras.new("Cam"))
scene.collection.objects.link(cam)
scene.camera = cam
tex = os.path.join(work, "textures", "big.png")
os.makedirs(os.path.dirname(tex), exist_ok=True)
with open(tex, "wb") as fh:
    fh.write(os.urandom(int(mib) << 20))
img = bpy.data.images.load(tex)
img.use_fake_user = True
img.filepath = "//textures/big.png"
bpy.ops.wm.save_as_mainfile(filepath=os.path.join(work, "shot.blend"))
runs = []
for i in range(int(repeat)):
    with open(tex, "r+b") as fh:  # new bytes each run: the farm has not seen this upload
        fh.write(os.urandom(64))
    t0 = time.perf_counter()
    bpy.ops.render_farm.submit(asynchronous=True, frames="1")
    held = time.perf_counter() - t0
    sub = addon.state.FARM.submission
    longest = 0.0
    while sub.busy:
        time.sleep(0.01)
        t1 = time.perf_counter()
        addon.state.drain()
        longest = max(longest, time.perf_counter() - t1)
    total = time.perf_counter() - t0
    assert sub.stage == "submitted", sub.text
    entry = addon.props.token_store().get(server)
    c = addon.client.FarmClient(server, entry["token"])
    model = c.request("GET", "/api/models/" + c.job(sub.job_id)["model_id"])
    runs.append({"held_s": held, "longest_drain_s": longest, "total_s": total,
                 "upload_mib": model["size_bytes"] / 2**20})
print("RUNS " + json.dumps(runs), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texture-mib", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from cli.farm import free_port

    with tempfile.TemporaryDirectory(prefix="rf-addon-bench-") as tmp:
        t = Path(tmp)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RENDERFARM_")}
        env["XDG_CONFIG_HOME"] = str(t / "config")
        farm = subprocess.Popen(
            [
                str(BIN / "renderfarm"),
                "up",
                "--agents",
                "0",
                "--port",
                str(port),
                "--data-dir",
                str(t / "farm"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(url + "/healthz", timeout=2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or farm.poll() is not None:
                        raise SystemExit("renderfarm up did not start") from None
                    time.sleep(0.3)
            password = (t / "farm" / "secrets" / "initial-admin-password").read_text().strip()
            built = subprocess.run(
                [str(BIN / "renderfarm"), "addon", "build", "-o", str(t / "dist")],
                capture_output=True,
                text=True,
                check=True,
            )
            zip_path = built.stdout.strip().splitlines()[-1]
            (t / "scene").mkdir()
            script = t / "bench.py"
            script.write_text(BLENDER_SCRIPT)
            benv = {**env, "BLENDER_USER_RESOURCES": str(t / "blender")}
            res = subprocess.run(
                [
                    sys.executable,
                    str(script),
                    zip_path,
                    url,
                    password,
                    str(t / "scene"),
                    str(args.texture_mib),
                    str(args.repeat),
                ],
                capture_output=True,
                text=True,
                env=benv,
                timeout=1800,
            )
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RUNS ")]
            if not line:
                raise SystemExit(res.stdout[-3000:] + res.stderr[-3000:])
            runs = json.loads(line[-1][5:])
        finally:
            farm.terminate()
            farm.wait(30)
    print(f"scene with a {args.texture_mib} MiB texture, {args.repeat} submissions (nothing rendered)")
    for i, r in enumerate(runs, 1):
        print(
            f"  run {i}: main thread held {r['held_s'] * 1000:.0f} ms by the button, then at most "
            f"{r['longest_drain_s'] * 1000:.1f} ms at a time; submission {r['total_s']:.2f} s "
            f"(upload {r['upload_mib']:.0f} MiB)"
        )
    held = statistics.median(r["held_s"] for r in runs)
    total = statistics.median(r["total_s"] for r in runs)
    longest = max(r["longest_drain_s"] for r in runs)
    print(
        f"median: main thread held {held * 1000:.0f} ms of a {total:.2f} s submission "
        f"({100 * held / total:.1f} %); longest timer run {longest * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
