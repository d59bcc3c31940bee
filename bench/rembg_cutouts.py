"""Run inside rembg's own venv by ``bench.matting``: rembg's cut-out and its alpha matting of
each photo, saved as RGBA PNGs, with the time of each call.

    python bench/rembg_cutouts.py MODEL OUT_DIR PHOTO...   # U2NET_HOME: the weights' folder

It imports nothing of this project: rembg's venv has only rembg.
"""

import json
import sys
import time
from pathlib import Path

from PIL import Image
from rembg import new_session, remove


def main() -> None:
    model, out = sys.argv[1], Path(sys.argv[2])
    session = new_session(model)
    times: dict[str, dict[str, float]] = {}
    for path in map(Path, sys.argv[3:]):
        photo = Image.open(path).convert("RGB")
        remove(photo, session=session)  # the first call of a size warms rembg's session
        times[path.name] = {}
        for kind, matting in (("cutout", False), ("matting", True)):
            t = time.perf_counter()
            cut = remove(photo, session=session, alpha_matting=matting)
            times[path.name][kind] = time.perf_counter() - t
            cut.save(out / f"{kind}-{path.stem}.png")
    (out / "times.json").write_text(json.dumps(times))


if __name__ == "__main__":
    main()
