"""Push a hadapeft adapter folder to the Hugging Face Hub with a model card.

    python -m scripts.push_to_hub ADAPTER_DIR --repo-id user/name [--private] [--base-model X] [--base-model-id ID]
    python -m scripts.push_to_hub ADAPTER_DIR --repo-id user/name --dry-run OUT_DIR   # write what would be uploaded

Steps: (1) check that the adapter loads onto its base model (``adapter_config.json``'s base_model_name_or_path, or
``--base-model``) and gives finite outputs; (2) stage the files to upload -- the adapter weights and config (and any
named sub-adapters), the tokenizer / image processor, ``hadapeft_training.json``, a hadapeft wheel built from the
checkout in use (hadapeft is not on PyPI: the card installs it from the Hub), the recipe's randomly built base model
(``base_model/``) when there is no ``--base-model-id``, and a freshly written README.md model card (YAML front matter
with base_model, ``library_name: peft`` and tags incl. ``hadapeft`` and the adapter type; how to install and load
it) -- leaving out checkpoints and logs; (3) ``HfApi.create_repo`` (``exist_ok``) and ``HfApi.upload_folder`` of
exactly the staged folder. ``--dry-run OUT_DIR`` stops after (2) with the staged folder at OUT_DIR.

Authentication is huggingface_hub's own (``hf auth login``, or ``HF_TOKEN``); the token is never printed.
``HF_ENDPOINT`` selects another Hub endpoint (a mirror, or a local test server).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # python scripts/push_to_hub.py: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Files of an adapter folder that belong on the Hub: peft's, the tokenizer's / processor's, the recipe's record.
UPLOADED = {
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "hadapeft_training.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
}
BASE_DIR = "base_model"  # where the recipes save a randomly built base (random_init)
# What building the wheel copies of the checkout: all but these (a build in the checkout itself would leave build/
# and *.egg-info there, and setuptools puts stale files of an old build/ into the wheel).
NOT_BUILT = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                   ".pytest_cache", ".hypothesis", "tmp")


def check_loads(adapter_dir: str, base_model: str | None) -> str:
    """Load the adapter onto its base and run it once; returns the base model used."""
    import torch

    import hadapeft
    from recipes.loading import dummy_inputs, load_adapter_model

    model, base = load_adapter_model(adapter_dir, base_model)
    model.eval()
    inputs = dummy_inputs(model)
    cfg = model.peft_config[model.active_adapter]
    batch = next(iter(inputs.values())).shape[0]
    with torch.no_grad():
        if getattr(cfg, "num_tasks", None):
            with hadapeft.conditioning(model, task_ids=torch.zeros(batch, dtype=torch.long)):
                out = model(**inputs)
        elif getattr(cfg, "task_embed_dim", None):
            with hadapeft.conditioning(model, task_embeds=torch.zeros(batch, cfg.task_embed_dim)):
                out = model(**inputs)
        else:
            out = model(**inputs)
    if not torch.isfinite(out.logits).all():
        raise SystemExit(f"error: {adapter_dir} loads onto {base} but gives non-finite outputs; not pushing it")
    from peft import get_peft_model_state_dict

    n = len(get_peft_model_state_dict(model))
    print(f"check: {adapter_dir} loads onto {base} with PeftModel.from_pretrained ({n} adapter tensors) and runs")
    return base


def build_wheel(dest: Path) -> str:
    """Build the wheel of the hadapeft checkout in use into ``dest`` (``pip wheel --no-deps``, with the build backend
    of this environment, so offline too); returns its file name."""
    import hadapeft

    root = Path(hadapeft.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise SystemExit(f"error: hadapeft is imported from {root}, which is no source checkout (no pyproject.toml): "
                         f"run push_to_hub from a checkout, so that its wheel can be built and uploaded")
    with tempfile.TemporaryDirectory(prefix="hadapeft-wheel-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "wheel"
        shutil.copytree(root, src, ignore=NOT_BUILT)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out),
               str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(out.glob("hadapeft-*.whl")) if proc.returncode == 0 else []
        if len(wheels) != 1:
            raise SystemExit(f"error: building hadapeft's wheel failed (pip wheel --no-deps --no-build-isolation "
                             f"{root}; needs setuptools>=77 here):\n{(proc.stdout + proc.stderr)[-3000:]}")
        shutil.copy2(wheels[0], dest / wheels[0].name)
    return wheels[0].name


def stage(adapter_dir: str, dest: Path, repo_id: str, base_model_id: str | None) -> list[str]:
    """Copy the files to upload into ``dest`` (created; must be empty): the adapter's, hadapeft's wheel, the
    recipe-built base model unless ``base_model_id`` names one on the Hub; and write the model card there."""
    from recipes.modelcard import write_model_card

    src = Path(adapter_dir)
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"error: {dest} is not empty; pass a new folder to --dry-run")
    dest.mkdir(parents=True, exist_ok=True)
    ship_base = not base_model_id and (src / BASE_DIR / "config.json").is_file()
    left_out = []
    for item in sorted(src.iterdir()):
        if item.is_file() and item.name in UPLOADED:
            shutil.copy2(item, dest / item.name)
        elif item.is_dir() and (item / "adapter_config.json").is_file() and not item.name.startswith("checkpoint-"):
            shutil.copytree(item, dest / item.name)  # a named adapter saved by peft in its own sub-folder
        elif item.name == BASE_DIR and ship_base:
            shutil.copytree(item, dest / item.name)  # the randomly built base: others cannot get it elsewhere
        elif item.name != "README.md":
            left_out.append(item.name + ("/" if item.is_dir() else ""))
    wheel = build_wheel(dest)
    write_model_card(dest, repo_id=repo_id, base_model_id=base_model_id, wheel=wheel, base_shipped=ship_base)
    if left_out:
        print(f"not uploaded: {', '.join(left_out)}")
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())


def push(adapter_dir: str, repo_id: str, dry_run: str | None = None, private: bool = False,
         base_model: str | None = None, base_model_id: str | None = None, commit_message: str | None = None,
         revision: str | None = None, check: bool = True) -> dict:
    import json

    if "/" not in repo_id or repo_id.count("/") != 1:
        raise SystemExit(f"error: --repo-id {repo_id!r} must be of the form user/name")
    base = check_loads(adapter_dir, base_model) if check else base_model
    named = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_model_id and (Path(adapter_dir) / BASE_DIR / "config.json").is_file():
        print(f"note: the base model was built by the recipe ({BASE_DIR}/): it is uploaded with the adapter")
    elif not base_model_id and (not named or Path(named).exists()):
        print(f"note: the base model is a local folder ({named}); pass --base-model-id to name its Hub id in the "
              f"model card, so that others can load the adapter")
    if dry_run:
        files = stage(adapter_dir, Path(dry_run), repo_id, base_model_id)
        print(f"dry run: {len(files)} files that would be uploaded to {repo_id} are in {dry_run}/: {', '.join(files)}")
        return {"files": files, "folder": dry_run, "base_model": base}

    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise SystemExit("error: not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN")
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="hadapeft-push-") as tmp:
        files = stage(adapter_dir, Path(tmp) / "upload", repo_id, base_model_id)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        print(f"repo: {url}" + (" (private)" if private else ""))
        info = api.upload_folder(folder_path=str(Path(tmp) / "upload"), repo_id=repo_id, repo_type="model",
                                 revision=revision, commit_message=commit_message or "Upload hadapeft adapter")
    print(f"uploaded {len(files)} files: {', '.join(files)}\ncommit: {getattr(info, 'commit_url', info)}")
    return {"files": files, "repo_url": str(url), "commit_url": getattr(info, "commit_url", str(info)),
            "base_model": base}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.push_to_hub", description=__doc__.split("\n")[0])
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--repo-id", required=True, help="target repo, user/name or org/name")
    p.add_argument("--dry-run", metavar="OUT_DIR", help="write the folder that would be uploaded here; upload nothing")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--base-model", help="base model folder or Hub id to check loading against "
                                        "(default: the adapter config's base_model_name_or_path)")
    p.add_argument("--base-model-id", help="the base model's Hub id for the model card, when the adapter config "
                                           "names a local folder")
    p.add_argument("--commit-message", help="commit message (default: 'Upload hadapeft adapter')")
    p.add_argument("--revision", help="branch to push to (default: main)")
    p.add_argument("--no-check", action="store_true", help="skip loading the adapter onto its base first")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    return push(a.adapter, a.repo_id, a.dry_run, a.private, a.base_model, a.base_model_id, a.commit_message,
                a.revision, check=not a.no_check)


if __name__ == "__main__":
    main()
