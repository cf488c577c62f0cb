"""What runs inside a Golem-style subtask, by task type. Each writes its outputs to
`results/` in its working folder; the agent sends them back to the coordinator.

- Python: `options.script`, the source of a script, run as __main__ with
  VESPID_SUBTASK_INDEX and VESPID_SUBTASK_COUNT set; files named in `options.outputs` are
  results too.
- GLambda: `options.method` and `options.args`, cloudpickled and base64-encoded as Golem
  does; the function's return value goes to result.json as {"data": ...}, an exception as
  {"error": "<class>:<message>"}; stdout.log and stderr.log are results too.
- Fractal: a Mandelbrot image of `options.resolution` [width, height], cut into horizontal
  bands by subtask index; each subtask writes its band as tile_<index>.png, which the
  requester stitches (the seed's Blender example, without Blender).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from vespid.shared import png

RESULTS = Path("results")


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    index = int(os.environ.get("VESPID_SUBTASK_INDEX", "0"))
    count = int(os.environ.get("VESPID_SUBTASK_COUNT", "1"))
    RESULTS.mkdir(exist_ok=True)
    options = spec.get("options") or {}
    EXECUTORS[spec["type"]](options, index, count)
    for name in options.get("outputs") or []:
        source = Path(name)
        if source.is_file():
            shutil.copy2(source, RESULTS / source.name)


def run_python(options: dict[str, Any], _index: int, _count: int) -> None:
    code = compile(options["script"], "<subtask script>", "exec")
    exec(code, {"__name__": "__main__"})


def run_glambda(options: dict[str, Any], _index: int, _count: int) -> None:
    import cloudpickle

    method = cloudpickle.loads(base64.b64decode(options["method"]))
    raw_args = options.get("args")
    args = cloudpickle.loads(base64.b64decode(raw_args)) if raw_args else None
    with (RESULTS / "stdout.log").open("w") as out, (RESULTS / "stderr.log").open("w") as err, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            outcome: dict[str, Any] = {"data": method(args)}
        except Exception as exc:  # noqa: BLE001 - the requester gets the error as data
            outcome = {"error": f"{type(exc).__name__}:{exc}"}
    (RESULTS / "result.json").write_text(json.dumps(outcome))


def band(height: int, index: int, count: int) -> tuple[int, int]:
    return height * index // count, height * (index + 1) // count


def render_rows(width: int, height: int, first: int, last: int,
                iterations: int = 64) -> list[bytes]:
    """Rows first..last-1 of the whole image; the same rows whatever the tiling."""
    rows = []
    for y in range(first, last):
        row = bytearray()
        imaginary = -1.2 + 2.4 * y / max(height - 1, 1)
        for x in range(width):
            real = -2.2 + 3.2 * x / max(width - 1, 1)
            z_re = z_im = 0.0
            n = 0
            while n < iterations and z_re * z_re + z_im * z_im <= 4.0:
                z_re, z_im = z_re * z_re - z_im * z_im + real, 2 * z_re * z_im + imaginary
                n += 1
            shade = 0 if n == iterations else 255 - (n * 255 // iterations)
            row += bytes((shade, (shade * 3) % 256, (255 - shade) % 256))
        rows.append(bytes(row))
    return rows


def run_fractal(options: dict[str, Any], index: int, count: int) -> None:
    width, height = (int(v) for v in options.get("resolution", [200, 150]))
    first, last = band(height, index, count)
    if options.get("format", "PNG").upper() != "PNG":
        raise SystemExit("only the PNG format is supported")
    (RESULTS / f"tile_{index:04d}.png").write_bytes(
        png.encode(width, render_rows(width, height, first, last)))


EXECUTORS = {"Python": run_python, "GLambda": run_glambda, "Fractal": run_fractal}

if __name__ == "__main__":
    main(sys.argv[1])
