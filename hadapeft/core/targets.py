"""Default ``target_modules`` per model family (transformers ``model_type``), per adapter kind.

Three kinds of defaults:
* ``ATTENTION`` — the attention query and value projections: LoRA's usual choice, and the default of gated LoRA
  and FiLM;
* ``HYPERMOD`` — HyperMod's: key, value and the MLP's down projection on Llama-like causal LMs (the layers of
  ``IA3``), the attention query and value elsewhere. On SmolLM2-135M-Instruct's two-task problem (``python -m
  scripts._compare_ablation``, the validation split, three seeds) HyperMod on key / value / down at learning rate
  3e-3 beat the query / value placement at its best rate (1e-2) on every seed; on the ViT and the text encoder,
  where HyperMod on query / value is already hadapeft's best, nothing was measured that would move it;
* ``IA3`` — key, value and the MLP's down projection, with ``IA3_FEEDFORWARD`` (the down projection) scaled on its
  input, as in the (IA)³ paper;
* ``BLOCK_OUTPUT`` — the output projections of the attention and MLP sub-blocks. Not FiLM's default: on the compare
  script's ViT tasks, FiLM there scored 5.8 points (one new task) and 2.3 points (three tasks) below FiLM on
  the query/value projections, and level with it on the text task; pass ``target_modules`` to use it.
Regex strings are used where a suffix would also match an attention module (ViT's ``output.dense``).
"""

_LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo",
               "olmo2", "granite", "starcoder2", "cohere", "stablelm", "smollm3")
_VIT_LIKE = ("vit", "deit", "vit_mae", "vit_msn", "dinov2", "beit", "yolos")

ATTENTION = {
    **{m: ["q_proj", "v_proj"] for m in _LLAMA_LIKE},
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    # transformers < 5 names ViT projections query/key/value and output.dense; >= 5 q_proj/k_proj/v_proj and mlp.fc2.
    **{m: r".*\.(query|value|q_proj|v_proj)" for m in _VIT_LIKE},
    "clip_vision_model": ["q_proj", "v_proj"],
    "siglip_vision_model": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
}

IA3 = {
    **{m: ["k_proj", "v_proj", "down_proj"] for m in _LLAMA_LIKE},
    "gpt2": ["c_attn", "mlp.c_proj"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "opt": ["k_proj", "v_proj", "fc2"],
    "bert": r".*\.(key|value)|.*layer\.\d+\.output\.dense",
    "roberta": r".*\.(key|value)|.*layer\.\d+\.output\.dense",
    "distilbert": ["k_lin", "v_lin", "lin2"],
    **{m: r".*\.(key|value|k_proj|v_proj)|.*layers?\.\d+\.(output\.dense|mlp\.fc2)" for m in _VIT_LIKE},
    "clip_vision_model": ["k_proj", "v_proj", "fc2"],
    "siglip_vision_model": ["k_proj", "v_proj", "fc2"],
    "t5": ["k", "v", "wo"],
}
IA3["phi3"] = ["qkv_proj", "down_proj"]

IA3_FEEDFORWARD = {
    **{m: ["down_proj"] for m in _LLAMA_LIKE},
    "gpt2": ["mlp.c_proj"],
    "gpt_neox": ["dense_4h_to_h"],
    "opt": ["fc2"],
    "bert": r".*layer\.\d+\.output\.dense",
    "roberta": r".*layer\.\d+\.output\.dense",
    "distilbert": ["lin2"],
    **{m: r".*layers?\.\d+\.(output\.dense|mlp\.fc2)" for m in _VIT_LIKE},
    "clip_vision_model": ["fc2"],
    "siglip_vision_model": ["fc2"],
    "t5": ["wo"],
}

BLOCK_OUTPUT = {
    **{m: ["o_proj", "down_proj"] for m in _LLAMA_LIKE},
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
    "gpt_neox": ["attention.dense", "dense_4h_to_h"],
    "gptj": ["out_proj", "fc_out"],
    "opt": ["out_proj", "fc2"],
    "bert": r".*\.output\.dense",
    "roberta": r".*\.output\.dense",
    "xlm-roberta": r".*\.output\.dense",
    "distilbert": ["out_lin", "lin2"],
    **{m: r".*\.(output\.dense|o_proj|fc2)" for m in _VIT_LIKE},
    "clip_vision_model": ["out_proj", "fc2"],
    "siglip_vision_model": ["out_proj", "fc2"],
    "t5": ["o", "wo"],
}

# Fused query/key/value projections whose output is [q; k; v] in equal thirds; HadaIA3 can scale only k and v there.
FUSED_QKV = {"gpt2": ["c_attn"]}  # timm ViTs: pass fused_qkv_modules=["qkv"]

# HyperMod's defaults (see the module docstring): the Llama-like layers of IA3, query / value for everything else.
HYPERMOD = {**ATTENTION, **{m: IA3[m] for m in _LLAMA_LIKE if m != "phi3"}}
