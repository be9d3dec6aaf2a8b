"""Convert a py:percent draft (nbs/_scratch/NAME.py) into nbs/NAME.ipynb (authoring aid; the notebook is the source).

Usage: python tools/py2nb.py nbs/_scratch/02_kernels.py [more.py ...] [--out-dir nbs]
The reverse (to edit an existing notebook as text): jupytext --to py:percent -o nbs/_scratch/X.py nbs/X.ipynb
"""
import sys, json
from pathlib import Path
import jupytext

def convert(src: Path, out_dir: Path):
    nb = jupytext.read(src, fmt="py:percent")
    nb.metadata.pop("jupytext", None)
    nb.metadata["kernelspec"] = {"display_name": "python3", "language": "python", "name": "python3"}
    out = out_dir / (src.stem + ".ipynb")
    tmp = out.parent / f".{out.stem}.tmp.ipynb"
    jupytext.write(nb, tmp, fmt="ipynb")
    tmp.replace(out)  # atomic: other writers never see a half-written notebook
    print(f"wrote {out}")

if __name__ == "__main__":
    args = sys.argv[1:]
    out_dir = Path("nbs")
    if "--out-dir" in args:
        i = args.index("--out-dir"); out_dir = Path(args[i + 1]); del args[i:i + 2]
    for a in args: convert(Path(a), out_dir)
