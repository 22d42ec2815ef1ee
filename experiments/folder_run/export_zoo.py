"""Writes a zoo model as a diffusers pipeline folder, for a real-size run through the folder loading path (#29).

`python -m experiments.folder_run.export_zoo wan2.1-t2v-14b DEST`: generates (or reuses) the zoo's synthetic
checkpoints, as a cell would, and writes DEST/model_index.json plus one folder per component with its
`config.json` and its weights as a symbolic link to the synthetic safetensors file. No weight is copied, so a
28.6 GB DiT costs no disk; what differs from the zoo cell is only the loading path: `harness.models.folder` reads
the folder's headers for the plan, and the child's `FolderReader` maps the folder's tensor names to the module's.

Only families whose folder tensor names are the zoo module's own names (Wan: `transformer`, `text_encoder` (UMT5),
`vae`) can be written as links; FLUX (two text encoders in one zoo module) and Qwen-Image (Qwen2.5-VL's
`model.` prefix) would need renamed copies, and the script refuses them, naming the component.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from harness.cell.checkpoint import ensure_checkpoint
from harness.models import get_model
from harness.models.folder import read_header, role_tensors

# role -> (sub-folder, library, class, weights file name), per family
LAYOUT = {
    "wan": {
        "pipeline": "WanPipeline",
        "dit": ("transformer", "diffusers", "WanTransformer3DModel", "diffusion_pytorch_model.safetensors"),
        "text_encoder": ("text_encoder", "transformers", "UMT5EncoderModel", "model.safetensors"),
        "model_type": "umt5",  # the transformers config's own key for the text encoder
        "vae": ("vae", "diffusers", "AutoencoderKLWan", "diffusion_pytorch_model.safetensors"),
    },
}


def export(name: str, dest: Path, device: str | None = None) -> Path:
    """Writes zoo model `name` as a pipeline folder at `dest` (weights linked, not copied) and checks that the
    folder reads back, tensor for tensor, as the zoo's checkpoints."""
    spec = get_model(name)
    layout = LAYOUT.get(spec.family)
    if layout is None or spec.edit:
        raise SystemExit(f"{name}: family {spec.family} cannot be written as links (its folder names differ from "
                         f"the zoo module's); families that can: {', '.join(LAYOUT)}")
    dest.mkdir(parents=True, exist_ok=True)
    index: dict[str, object] = {"_class_name": layout["pipeline"], "_diffusers_version": "0.42.1"}
    files: dict[str, Path] = {}
    for role, comp in spec.components.items():
        sub, library, cls, weights = layout[role]
        files[role] = ensure_checkpoint(comp, seed=0, device=device,
                                        progress=lambda m: print(m, file=sys.stderr, flush=True))
        folder = dest / sub
        folder.mkdir(exist_ok=True)
        config = {"_class_name": cls, **comp.config}
        if library == "transformers":
            config = {**comp.config, "architectures": [cls], "model_type": layout["model_type"]}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        link = folder / weights
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(files[role], link)
        index[sub] = [library, cls]
    (dest / "model_index.json").write_text(json.dumps(index, indent=2))
    _check(spec.family, dest, files)
    return dest


def _check(family: str, dest: Path, files: dict[str, Path]) -> None:
    """Every role's folder tensors are the zoo checkpoint's, under the same names (what the child will read)."""
    tensors = role_tensors(dest, family)
    for role, path in files.items():
        want = set(read_header(path))
        got = {n for n, (f, stored, _) in tensors[role].items() if f == path.resolve() and stored == n}
        if got != want:
            missing = sorted(want - got)[:3]
            raise SystemExit(f"{dest}: component {role} does not read back as the zoo's checkpoint "
                             f"({len(want - got)} tensors missing, e.g. {missing})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="zoo name, e.g. wan2.1-t2v-14b or wan-tiny")
    p.add_argument("dest", type=Path, help="the pipeline folder to write")
    p.add_argument("--device", help="where the synthetic weights are generated (default: cuda if available)")
    args = p.parse_args(argv)
    print(export(args.model, args.dest, args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
