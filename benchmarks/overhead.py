"""Farm overhead: the same N frames (a) in one plain Blender process, (b) through `renderfarm up`.

Usage::

    .venv/bin/python benchmarks/overhead.py [--frames 10] [--repeat 3]

(a) runs one Blender process that opens the sample scene and renders frames
1..N as an animation (what an artist's shell loop does). (b) starts
`renderfarm up --agents 1` once, uploads the scene once, then for each
repeat submits a job of frames 1..N in one chunk and waits (polling every
50 ms) until it completes, so (b) counts dispatch, the Blender start, the
render, the frame checks and uploads, and the result report. (b+) is the
same plus the upload and inspection of a scene the farm has not seen and the
download of the frames, as `renderfarm submit --wait --download` does it.

Warm Blender: (w) submits the N frames as N one-frame tasks (``--chunk 1``) to that farm,
whose agent keeps one Blender process for the job's consecutive tasks; (c) submits the same
to a second farm started with ``renderfarm up --no-warm``, whose agent starts a fresh Blender
for each task, as before issue 5. c/w is the saving.

Runs alternate a, b, b+, w, c so that drift of the shared machine hits each alike; medians
and the median of the per-run ratios are printed.

The farm's calls send a personal token of its first admin (logged in with the password
`renderfarm up` generated in its data folder), as every user call must; `renderfarm up`
keeps its own CLI login in a temporary folder, not the user's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli.client import FarmClient  # noqa: E402
from cli.farm import free_port, make_sample_scene  # noqa: E402
from tests.production import admin_token  # noqa: E402

PLAIN = textwrap.dedent(
    """
    import sys, bpy
    blend, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    bpy.ops.wm.open_mainfile(filepath=blend, load_ui=False, use_scripts=False)
    s = bpy.context.scene
    s.frame_start, s.frame_end, s.frame_step = 1, n, 1
    s.render.filepath = out + "/frame_######"
    s.render.image_settings.file_format = "PNG"
    bpy.ops.render.render(animation=True)
    """
)


def plain(blend: Path, n: int, tmp: Path) -> float:
    """Seconds for one Blender process to render frames 1..n."""
    out = Path(tempfile.mkdtemp(dir=tmp))
    script = tmp / "plain.py"
    script.write_text(PLAIN)
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, str(script), str(blend), str(out), str(n)], check=True, capture_output=True
    )
    took = time.perf_counter() - t
    assert len(list(out.glob("*.png"))) == n
    return took


async def farm_job(url: str, token: str, model_id: str, n: int, chunk: int | None = None) -> float:
    """Seconds from job submission to completion through the farm (``token``: a user's), with
    frames 1..n in chunks of ``chunk`` frames (default: one task of n frames)."""
    async with FarmClient(url, token) as c:
        t = time.perf_counter()
        job = await c.create_job(model_id=model_id, frames=f"1-{n}", chunk_size=chunk or n)
        final = await c.wait(job["id"], poll_s=0.05)
        took = time.perf_counter() - t
    assert final["state"] == "completed" and final["frames_done"] == n, final
    return took


async def farm_full(url: str, token: str, blend: Path, n: int, tmp: Path, seen: set[str]) -> float:
    """Seconds for upload + inspection + job + download, as `submit --wait --download` does
    (``token``: a user's).

    ``blend`` must be a scene the farm has not seen (an identical upload is reused
    without inspection, which would flatter the figure); ``seen`` holds the model ids so far.
    """
    out = Path(tempfile.mkdtemp(dir=tmp))
    async with FarmClient(url, token) as c:
        t = time.perf_counter()
        model = await c.upload_model(blend)
        if model["id"] in seen:
            raise RuntimeError("the upload was reused, not inspected: the benchmark needs a fresh scene")
        seen.add(model["id"])
        job = await c.create_job(model_id=model["id"], frames=f"1-{n}", chunk_size=n)
        final = await c.wait(job["id"], poll_s=0.05)
        paths = await c.download(job["id"], out)
        took = time.perf_counter() - t
    assert final["state"] == "completed" and len(paths) == n
    return took


def start_farm(tmp: Path, name: str, *flags: str) -> tuple[str, subprocess.Popen, str]:
    """Start ``renderfarm up --agents 1`` with its data in ``tmp/name``; return (URL, process,
    a personal token of its first admin).

    Raises:
        RuntimeError: the farm did not answer within 20 s.
    """
    port = free_port()
    up = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("renderfarm")),
            "up",
            "--port",
            str(port),
            "--agents",
            "1",
            "--data-dir",
            str(tmp / name),
            *flags,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "XDG_CONFIG_HOME": str(tmp / f"config-{name}")},  # its CLI login: not the user's
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            return url, up, admin_token(url, tmp / name, "overhead benchmark")
        except urllib.error.HTTPError:  # it answered and refused: say so
            up.terminate()
            raise
        except OSError:  # not answering yet (or the password file not written yet)
            time.sleep(0.1)
    up.terminate()
    raise RuntimeError("farm did not start")


def main() -> None:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = args.frames
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        blend = asyncio.run(make_sample_scene(tmp / "sample_scene.blend"))
        url, up, token = start_farm(tmp, "farm")
        cold_up = None
        try:
            cold_url, cold_up, cold_token = start_farm(tmp, "farm-cold", "--no-warm")

            async def upload(where: str, key: str) -> str:
                async with FarmClient(where, key) as c:
                    return (await c.upload_model(blend))["id"]

            model_id = asyncio.run(upload(url, token))
            cold_model = asyncio.run(upload(cold_url, cold_token))
            seen = {model_id}
            asyncio.run(farm_job(url, token, model_id, 1))  # warm-up: first Blender start, caches
            asyncio.run(farm_job(cold_url, cold_token, cold_model, 1))
            plain(blend, 1, tmp)
            a, b, full, w, c = [], [], [], [], []
            for i in range(args.repeat):
                a.append(plain(blend, n, tmp))
                b.append(asyncio.run(farm_job(url, token, model_id, n)))
                fresh = asyncio.run(make_sample_scene(tmp / f"fresh{i}.blend"))  # new bytes, not timed
                full.append(asyncio.run(farm_full(url, token, fresh, n, tmp, seen)))
                w.append(asyncio.run(farm_job(url, token, model_id, n, chunk=1)))
                c.append(asyncio.run(farm_job(cold_url, cold_token, cold_model, n, chunk=1)))
                print(
                    f"run {i + 1}: plain {a[-1]:.2f} s, farm job {b[-1]:.2f} s, "
                    f"farm with upload+download {full[-1]:.2f} s, {n} one-frame tasks: "
                    f"warm {w[-1]:.2f} s, cold {c[-1]:.2f} s",
                    flush=True,
                )
        finally:
            for proc in (up, cold_up):
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)
    ratios = [y / x for x, y in zip(a, b, strict=True)]
    ratios_full = [y / x for x, y in zip(a, full, strict=True)]
    print(f"\n{n} frames of the sample scene (320x240, Cycles 16 samples), {args.repeat} runs, medians:")
    print(f"  (a)  one plain Blender process:              {statistics.median(a):7.2f} s")
    print(f"  (b)  renderfarm up, 1 agent, job only:       {statistics.median(b):7.2f} s")
    print(f"  (b+) renderfarm, upload+inspect+job+download: {statistics.median(full):7.2f} s")
    print(f"  ratio b/a (median of per-run ratios):  {statistics.median(ratios):.3f}   (target <= 1.10)")
    print(f"  ratio b+/a (median of per-run ratios): {statistics.median(ratios_full):.3f}")
    saving = [y / x for x, y in zip(w, c, strict=True)]
    print(f"  (w)  {n} one-frame tasks, warm Blender:       {statistics.median(w):7.2f} s")
    print(f"  (c)  {n} one-frame tasks, a Blender per task: {statistics.median(c):7.2f} s")
    print(f"  ratio c/w, the warm saving (median of per-run ratios): {statistics.median(saving):.3f}")
    warm_vs_plain = [y / x for x, y in zip(a, w, strict=True)]
    print(f"  ratio w/a (median of per-run ratios): {statistics.median(warm_vs_plain):.3f}")


if __name__ == "__main__":
    main()
