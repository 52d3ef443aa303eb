"""The transformers MoE families smoe can patch, written as data.

Each sparse MoE block class of transformers 5.x is described by a :class:`Block` row: where its
router and experts live, how its router decides (a :class:`Routing` row), how its experts are
stored, its shared expert, and what its ``forward`` returns. :mod:`smoe.hf.patch` reads a loaded
block through its row and builds an :class:`smoe.MoELayer` over the block's own tensors.

Attribute paths are dotted and relative to the router module; a path that starts with
``block.`` is relative to the MoE block instead. Settings that real checkpoints vary
(``top_k``, ``norm_topk_prob``, ``routed_scaling_factor``, group counts, biases) are read from
the loaded modules, never copied from a default here.

Routing rules (``Routing.rule``), each with the transformers code it mirrors:

* ``softmax_topk``: softmax over all experts, top-K, optional renormalisation (Mixtral, Qwen-MoE,
  OLMoE, Jamba, HunYuan, Qwen3-VL/Omni-MoE, Qwen4-Exp). With K = 1 and renormalisation the
  weight is exactly 1, which smoe's ``topk_softmax`` gives (a softmax over one logit); that rule
  is used then. Optional group-limited choice (``top2_sum`` groups of the softmax scores;
  Mistral 4, Mistral Large 4): transformers scores dropped groups 0, below every kept expert's
  positive probability, so the choice is smoe's -inf mask whenever K fits the kept groups.
* ``topk_softmax``: top-K logits, softmax over those K (GraniteMoE, JetMoE, gpt-oss, Aria).
* ``sigmoid``: sigmoid scores, optional selection-only bias (``e_score_correction_bias``),
  optional group-limited choice (``top2_sum`` groups), renormalisation with an epsilon, routed
  scaling (DeepSeek-V3 and the routers copied from it: DeepSeek-V3.2, GLM-4.5, GLM-MoE-DSA,
  dots.llm1, Solar-Open, EXAONE-MoE, MiMo-V2-Flash, Kimi-Linear, Bailing-hybrid, GLM-4.5V,
  dots.3-note, A.X-K1, A.X-K2, Beam; and AFMoE, MiniMax-M2, HY-V3, Flint, LFM2-MoE, Step-3.7).
  A.X-K2 scores dropped groups 0 rather than -inf: the same choice while every biased score is
  positive, refused with a negative selection bias.
* ``deepseek_v2``: softmax, greedy or group-limited (``max`` groups) top-K, no renormalisation,
  routed scaling (also DeepSeek-OCR2's and Unlimited-OCR's text decoders).
* ``sparsemixer``: Phi-3.5-MoE's top-2 rule (inference form; see :class:`smoe.nn.Router`).
* ``dbrx``: softmax, top-K, weights divided by their p-norm (only p = 1, a plain
  renormalisation, or no normalisation can be expressed).
* ``llama4``: top-K logits, weight = sigmoid(logit), multiplied into the expert's input.
* ``cohere2``: top-K logits, then softmax (``topk_softmax``) or sigmoid with renormalisation,
  after ``expert_selection_fn``.

Expert layouts (``Block.layout``):

* ``stacked``: ``gate_up_proj`` [E, 2F, D] and ``down_proj`` [E, D, F] (the transformers 5
  Mixtral layout, smoe's own), optional ``*_bias``;
* ``gpt_oss``: ``gate_up_proj`` [E, D, 2F] with interleaved gate/up columns, ``down_proj``
  [E, F, D], biases (read through ``Experts.transposed`` and ``Experts.interleaved``);
* ``llama4``: ``gate_up_proj`` [E, D, 2F], ``down_proj`` [E, F, D] (``Experts.transposed``;
  Llama 4, Aria);
* ``dbrx``: ``mlp.w1``, ``mlp.v1``, ``mlp.w2``, each [E*F, D]
  (:class:`smoe.hf.experts.SplitExperts`);
* ``jetmoe``: ``input_linear.weight`` [E, 2F, D] and ``output_linear.weight`` [E, D, F] on the
  block.

Block outputs (``Block.returns``): ``hidden`` (same shape as the input), ``hidden_and_weights``
(gpt-oss: also the [T, K] routing weights), ``flat_hidden_and_logits`` (Llama 4: [T, D] and the
[T, E] router logits), ``flattened`` (ERNIE-4.5-VL: the input may be any selection of tokens
flattened to 1-D; returns the output and the router logits, both flattened to 1-D).

Families with MoE code that smoe cannot compute exactly are refused by block class in
:data:`REFUSED`, each message naming the missing feature; :data:`NO_ROUTED_EXPERTS` names the
``model_type`` of families that MoE searches list but that have no routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Routing", "Block", "FAMILIES", "BLOCKS", "REFUSED", "NO_ROUTED_EXPERTS",
           "SUPPORTED_FAMILIES"]

RULES = ("softmax_topk", "topk_softmax", "sigmoid", "deepseek_v2", "sparsemixer", "dbrx",
         "llama4", "cohere2")
LAYOUTS = ("stacked", "gpt_oss", "llama4", "dbrx", "jetmoe")
RETURNS = ("hidden", "hidden_and_weights", "flat_hidden_and_logits", "flattened")
ROUTER_RETURNS = ("logits_weights_indices", "logits", "scores_logits", "jetmoe")
LOGITS_DTYPES = ("input", "float32", "weight")
LOGITS_OUT_DTYPES = ("computed", "float32")
WEIGHTS_OUT_DTYPES = ("float32", "logits", "input")


@dataclass(frozen=True)
class Routing:
    """How one transformers router class decides.

    rule: one of ``RULES`` (see the module docstring).
    weight, bias: paths of the router's linear weight [E, D] and bias [E] (gpt-oss).
    top_k: path of K.
    logits: dtype of the router's linear: ``input`` (the hidden states' dtype), ``float32``
        (both operands upcast), ``weight`` (the input cast to the weight's dtype).
    logits_out: dtype of the logits the router returns: ``computed`` (the linear's) or
        ``float32`` (upcast after the linear).
    weights_out: dtype of the routing weights it returns: ``float32``, ``logits`` or ``input``.
    norm: renormalise the K weights: a constant or the path of a flag.
    norm_eps: added to the sum of the K sigmoid scores before renormalising.
    scale: routed scaling factor: a constant or a path.
    correction_bias: path of the selection-only bias of ``sigmoid`` rules (``None``: zero).
    groups: read group-limited routing from ``num_group`` / ``topk_group``.
    returns: what the router returns, one of ``ROUTER_RETURNS``.
    selection: a rule of :class:`smoe.hf.routers.HFRouter` (``softmax_bias``, ``logits_bias``)
        that replaces how the experts are chosen; ``correction_bias`` is its bias.
    softcap: path of a logit soft-capping constant (0 or ``None`` is off).
    norm_min: path of the floor of the renormalising sum (``softmax_bias``).
    """

    rule: str
    weight: str = "weight"
    bias: str | None = None
    top_k: str = "top_k"
    logits: str = "input"
    logits_out: str = "computed"
    weights_out: str = "float32"
    norm: bool | str = True
    norm_eps: float = 1e-20
    scale: float | str = 1.0
    correction_bias: str | None = None
    groups: bool = False
    returns: str = "logits_weights_indices"
    selection: str | None = None
    softcap: str | None = None
    norm_min: str | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule={self.rule!r} is invalid: must be one of {', '.join(RULES)}")
        if self.returns not in ROUTER_RETURNS:
            raise ValueError(f"returns={self.returns!r} is invalid")
        for name, allowed in (("logits", LOGITS_DTYPES), ("logits_out", LOGITS_OUT_DTYPES),
                              ("weights_out", WEIGHTS_OUT_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be one of "
                                 f"{', '.join(allowed)}")


@dataclass(frozen=True)
class Block:
    """One transformers sparse MoE block class.

    name: the block's class name. routing: its :class:`Routing`. router: the router's attribute.
    layout: how the experts are stored, one of ``LAYOUTS``; experts: their attribute.
    shared: attribute of the shared-expert MLP (``gate_proj``/``up_proj``/``down_proj``).
    shared_gate: attribute of the ``Linear(D, 1)`` whose sigmoid scales the shared output.
    returns: what ``forward`` returns, one of ``RETURNS``.
    jitter: paths of multiplicative input-jitter amplitudes applied in training (the block's
        and its router's; ``None`` or 0 means off).
    output_bias: path of a bias added to the block's output (JetMoE).
    shared_combine: path of a ``"sum"`` / ``"average"`` setting for routed + shared outputs
        (Cohere2-MoE); ``None`` means sum.
    output_norm: path of a module applied to the block's output (A.X-K1's
        ``post_mlp_layernorm``).
    unclamped: paths of SwiGLU clamp limits that must be off (``None``, 0 or infinite) for
        smoe to compute the block (Step-3.7 clamps only some layers); a set limit is refused.
    """

    name: str
    routing: Routing
    router: str = "gate"
    layout: str = "stacked"
    experts: str = "experts"
    shared: str | None = None
    shared_gate: str | None = None
    returns: str = "hidden"
    jitter: tuple[str, ...] = ()
    output_bias: str | None = None
    shared_combine: str | None = None
    output_norm: str | None = None
    unclamped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} is invalid")
        if self.returns not in RETURNS:
            raise ValueError(f"returns={self.returns!r} is invalid")


# -- routers ----------------------------------------------------------------------------------
#: Mixtral / MiniMax: linear in the input dtype, softmax in float32, always renormalised.
MIXTRAL = Routing("softmax_topk")
#: Qwen2/3-MoE, OLMoE, FlexOlmo, Mellum, Qwen3-Next: renormalisation is ``norm_topk_prob``;
#: the weights are returned in the logits' dtype.
QWEN = Routing("softmax_topk", norm="norm_topk_prob", weights_out="logits")
#: Qwen3.5-MoE: always renormalised.
QWEN_NORM = Routing("softmax_topk", weights_out="logits")
#: Jamba: never renormalised, weights in the input dtype.
JAMBA = Routing("softmax_topk", norm=False, weights_out="input")
#: HunYuan-MoE-V1: ``wg`` is kept in float32 (then the input is upcast), always renormalised.
HUNYUAN = Routing("softmax_topk", weight="wg.weight", logits="weight", weights_out="logits")
#: GraniteMoE (and -Shared, -Hybrid, -SWA): top-K of float32-cast logits, softmax over them.
GRANITE = Routing("topk_softmax", logits_out="float32", weights_out="input")
#: JetMoE: as Granite, but the gating returns the expert-sorted dispatch plan.
JETMOE = Routing("topk_softmax", weight="layer.weight", logits_out="float32",
                 weights_out="input", returns="jetmoe")
#: gpt-oss: a router bias, top-K of the logits, softmax over them in the logits' dtype.
GPT_OSS = Routing("topk_softmax", bias="bias", weights_out="logits")
#: DeepSeek-V3 and the routers copied from it: float32 sigmoid, correction bias, groups.
DEEPSEEK_V3 = Routing("sigmoid", logits="float32", norm="norm_topk_prob",
                      scale="routed_scaling_factor", correction_bias="e_score_correction_bias",
                      groups=True)
#: DeepSeek-V2: float32 softmax, greedy or group-limited top-K, scaled, not renormalised.
DEEPSEEK_V2 = Routing("deepseek_v2", logits="float32", norm=False,
                      scale="routed_scaling_factor")
#: AFMoE: sigmoid of float32-cast logits, the block's ``expert_bias``, always renormalised.
AFMOE = Routing("sigmoid", weight="gate.weight", logits_out="float32",
                scale="route_scale", correction_bias="block.expert_bias")
#: MiniMax-M2: input cast to the weight's dtype, sigmoid, the block's correction bias.
MINIMAX_M2 = Routing("sigmoid", logits="weight", correction_bias="block.e_score_correction_bias")
#: HY-V3: float32 sigmoid, the block's correction bias, ``router_scaling_factor``.
HY_V3 = Routing("sigmoid", logits="float32", scale="router_scaling_factor",
                correction_bias="block.e_score_correction_bias")
#: Flint: float32 sigmoid, no bias, ``norm_topk_prob``.
FLINT = Routing("sigmoid", logits="float32", norm="norm_topk_prob")
#: LFM2-MoE: sigmoid in the input dtype, the block's ``expert_bias`` when ``use_expert_bias``,
#: renormalised with +1e-6, scaled.
LFM2 = Routing("sigmoid", norm="norm_topk_prob", norm_eps=1e-6, scale="routed_scaling_factor",
               correction_bias="block.expert_bias", weights_out="logits")
#: Phi-3.5-MoE: a Linear subclass as router, SparseMixer top-2 in the logits' dtype.
PHIMOE = Routing("sparsemixer", weights_out="logits", selection="sparsemixer_sampling")
#: DBRX: ``router.layer`` is the linear, K and the p-norm live on the block.
DBRX = Routing("dbrx", weight="layer.weight", top_k="block.top_k",
               norm="block.moe_normalize_expert_weights", weights_out="logits", returns="logits")
#: ERNIE-4.5-MoE: float32 softmax, selection bias added to the probabilities, sum floored.
ERNIE = Routing("softmax_topk", logits="float32", weights_out="input", selection="softmax_bias",
                correction_bias="moe_statics.e_score_correction_bias", norm_min="norm_min")
#: Kolibri-1: float32 logits, top-K of logits + bias, sigmoid weights, ``norm_topk_prob``.
KOLIBRI = Routing("sigmoid", logits="float32", norm="norm_topk_prob", norm_eps=0.0,
                  correction_bias="e_score_correction_bias", selection="logits_bias")
#: Laguna: logits in the input dtype, optional soft-capping, sigmoid + selection bias, always
#: renormalised (no epsilon), the block's routed scaling.
LAGUNA = Routing("sigmoid", logits_out="float32", norm_eps=0.0, weights_out="input",
                 correction_bias="e_score_correction_bias", softcap="router_logit_softcapping",
                 scale="block.routed_scaling_factor")
#: Llama 4: sigmoid of the top-K logits, applied to the expert's input.
LLAMA4 = Routing("llama4", weights_out="logits", returns="scores_logits")
#: Mistral 4: softmax in the input dtype, group-limited (top-2 sums) choice, ``norm_topk_prob``
#: with +1e-20, routed scaling.
MISTRAL4 = Routing("softmax_topk", norm="norm_topk_prob", norm_eps=1e-20,
                   scale="routed_scaling_factor", groups=True, weights_out="logits")
#: Mistral Large 4: as Mistral 4 with float32 logits and always renormalised.
MISTRAL_LARGE4 = Routing("softmax_topk", logits="float32", norm_eps=1e-20,
                         scale="routed_scaling_factor", groups=True, weights_out="logits")
#: A.X-K2: DeepSeek-V3's router with optional groups whose dropped experts score 0, not -inf.
AXK2 = Routing("sigmoid", logits="float32", norm="norm_topk_prob",
               scale="routed_scaling_factor", correction_bias="e_score_correction_bias",
               groups=True)
#: Beam: DeepSeek-V3's router; the block scales the routed output (``routed_scaling_factor``).
BEAM = Routing("sigmoid", logits="float32", norm="norm_topk_prob",
               scale="block.routed_scaling_factor", correction_bias="e_score_correction_bias",
               groups=True)
#: Step-3.7: input cast to the weight's dtype, float32 sigmoid, selection bias, always
#: renormalised (no epsilon); the block scales the routed output.
STEP3P7 = Routing("sigmoid", logits="weight", norm_eps=0.0,
                  scale="block.routed_scaling_factor",
                  correction_bias="e_score_correction_bias")
#: Aria: top-K logits in the input dtype, softmax over those K.
ARIA = Routing("topk_softmax", weights_out="logits")
#: Cohere2-MoE: top-K logits, then softmax or normalised sigmoid (``expert_selection_fn``).
COHERE2 = Routing("cohere2", norm="norm_topk_prob", norm_eps=0.0, weights_out="input")


def _mixtral_like(prefix: str) -> Block:
    return Block(f"{prefix}SparseMoeBlock", MIXTRAL, jitter=("block.jitter_noise",))


def _qwen(prefix: str, routing: Routing = QWEN) -> Block:
    return Block(f"{prefix}SparseMoeBlock", routing)


def _qwen_shared(prefix: str, routing: Routing = QWEN) -> Block:
    return Block(f"{prefix}SparseMoeBlock", routing, shared="shared_expert",
                 shared_gate="shared_expert_gate")


def _deepseek_v3(name: str, shared: str | None = "shared_experts") -> Block:
    return Block(name, DEEPSEEK_V3, shared=shared)


def _granite(prefix: str) -> Block:
    return Block(f"{prefix}MoE", GRANITE, router="router")


#: model_type -> the sparse MoE block classes of that family.
FAMILIES: dict[str, tuple[Block, ...]] = {
    "mixtral": (_mixtral_like("Mixtral"),),
    "minimax": (_mixtral_like("MiniMax"),),
    "qwen2_moe": (_qwen_shared("Qwen2Moe"),),
    "qwen3_moe": (_qwen("Qwen3Moe"),),
    "qwen3_next": (_qwen_shared("Qwen3Next"),),
    "qwen3_5_moe_text": (_qwen_shared("Qwen3_5Moe", QWEN_NORM),),
    "olmoe": (_qwen("Olmoe"),),
    "flex_olmo": (_qwen("FlexOlmo"),),
    "mellum": (_qwen("Mellum"),),
    "jamba": (Block("JambaSparseMoeBlock", JAMBA, router="router"),),
    "hunyuan_v1_moe": (Block("HunYuanMoEV1Moe", HUNYUAN, shared="shared_mlp"),),
    "deepseek_v2": (Block("DeepseekV2Moe", DEEPSEEK_V2, shared="shared_experts"),),
    "deepseek_v3": (_deepseek_v3("DeepseekV3MoE"),),
    "glm4_moe": (_deepseek_v3("Glm4MoeMoE"),),
    "glm4_moe_lite": (_deepseek_v3("Glm4MoeLiteMoE"),),
    "dots1": (_deepseek_v3("Dots1MoE"),),
    "solar_open": (_deepseek_v3("SolarOpenMoE"),),
    "exaone_moe": (_deepseek_v3("ExaoneMoeSparseMoEBlock"),),
    "mimo_v2_flash": (_deepseek_v3("MiMoV2FlashMoE", shared=None),),
    "deepseek_v32": (_deepseek_v3("DeepseekV32MoE"),),
    "glm_moe_dsa": (_deepseek_v3("GlmMoeDsaMoE"),),
    "kimi_linear": (_deepseek_v3("KimiLinearMoE"),),
    "bailing_hybrid": (_deepseek_v3("BailingHybridMoE"),),
    "afmoe": (Block("AfmoeSparseMoeBlock", AFMOE, router="router", shared="shared_experts"),),
    "minimax_m2": (Block("MiniMaxM2SparseMoeBlock", MINIMAX_M2, jitter=("block.jitter_noise",)),),
    "hy_v3": (Block("HYV3MoE", HY_V3, shared="shared_experts"),),
    "flint": (Block("FlintSparseMoeBlock", FLINT, shared="shared_expert"),),
    "lfm2_moe": (Block("Lfm2MoeSparseMoeBlock", LFM2),),
    "cohere2_moe": (Block("Cohere2MoeSparseMoeBlock", COHERE2, shared="shared_experts",
                          shared_combine="block.shared_expert_combination_strategy"),),
    "gpt_oss": (Block("GptOssMLP", GPT_OSS, router="router", layout="gpt_oss",
                      returns="hidden_and_weights"),),
    "phimoe": (Block("PhimoeSparseMoeBlock", PHIMOE, router="router",
                     jitter=("block.input_jitter_noise", "input_jitter_noise")),),
    "granitemoe": (_granite("GraniteMoe"),),
    "granitemoeshared": (_granite("GraniteMoeShared"),),
    "granitemoehybrid": (_granite("GraniteMoeHybrid"),),
    "granitemoe_swa": (_granite("GraniteMoeSWA"),),
    "jetmoe": (Block("JetMoeMoE", JETMOE, router="router", layout="jetmoe", experts="",
                     output_bias="block.bias"),),
    "dbrx": (Block("DbrxFFN", DBRX, router="router", layout="dbrx",
                   jitter=("moe_jitter_eps",)),),
    "ernie4_5_moe": (Block("Ernie4_5_MoeSparseMoeBlock", ERNIE, shared="shared_experts"),),
    "kolibri1": (Block("Kolibri1SparseMoeBlock", KOLIBRI, shared="shared_experts"),),
    "laguna": (Block("LagunaSparseMoeBlock", LAGUNA, shared="shared_experts"),),
    "mistral4": (Block("Mistral4MoE", MISTRAL4, shared="shared_experts"),),
    "mistral_large4": (Block("MistralLarge4TextMoE", MISTRAL_LARGE4, shared="shared_experts"),),
    "qwen3_vl_moe": (_qwen("Qwen3VLMoeText", QWEN_NORM),),
    "qwen4_exp_text": (_qwen_shared("Qwen4ExpText"),),
    "glm4v_moe": (_deepseek_v3("Glm4vMoeTextMoE"),),
    "axk1": (Block("AXK1MoE", DEEPSEEK_V3, shared="shared_experts",
                   output_norm="block.post_mlp_layernorm"),),
    "axk2": (Block("AXK2MoE", AXK2, shared="shared_experts"),),
    "beam": (Block("BeamMoE", BEAM),),
    "step3p7": (Block("Step3p7SparseMoeBlock", STEP3P7, shared="shared_experts",
                      unclamped=("block.experts.limit", "block.shared_experts.limit")),),
    "deepseek_ocr2": (Block("DeepseekOcr2TextMoe", DEEPSEEK_V2, shared="shared_experts"),),
    "unlimited_ocr": (Block("UnlimitedOcrTextMoe", DEEPSEEK_V2, shared="shared_experts"),),
    # Modality-isolated experts: the outer block sends text and vision tokens to two inner
    # blocks (each an ERNIE-4.5 router and experts), both patched; the shared expert stays.
    "ernie4_5_vl_moe": (Block("Ernie4_5_VLMoeSparseMoeBlock", ERNIE, returns="flattened"),),
    "aria": (Block("AriaTextMoELayer", ARIA, router="router", layout="llama4",
                   shared="shared_experts"),),
    # Its vision tower's MoE (Dots3NoteVisionMoE, a router taking the bias as an argument) is
    # left to run as it is; the text decoder's blocks are patched.
    "dots3_note": (_deepseek_v3("Dots3NoteTextMoE"),),
    # The thinker's blocks are Qwen3-MoE's, the talker's Qwen2-MoE's (gated shared expert).
    "qwen3_omni_moe": (_qwen("Qwen3OmniMoeThinkerText"),
                       _qwen_shared("Qwen3OmniMoeTalkerText")),
    "llama4_text": (Block("Llama4TextMoe", LLAMA4, router="router", layout="llama4",
                          shared="shared_expert", returns="flat_hidden_and_logits"),),
}
# Composite models whose text decoder is one of the above.
FAMILIES["llama4"] = FAMILIES["llama4_text"]
FAMILIES["qwen3_5_moe"] = FAMILIES["qwen3_5_moe_text"]
FAMILIES["qwen4_exp"] = FAMILIES["qwen4_exp_text"]
FAMILIES["aria_text"] = FAMILIES["aria"]
FAMILIES["dots3_note_text"] = FAMILIES["dots3_note"]
FAMILIES["qwen3_vl_moe_text"] = FAMILIES["qwen3_vl_moe"]
FAMILIES["glm4v_moe_text"] = FAMILIES["glm4v_moe"]
FAMILIES["mistral_large4_text"] = FAMILIES["mistral_large4"]
FAMILIES["deepseek_ocr2_text"] = FAMILIES["deepseek_ocr2"]
FAMILIES["unlimited_ocr_text"] = FAMILIES["unlimited_ocr"]
FAMILIES["ernie4_5_vl_moe_text"] = FAMILIES["ernie4_5_vl_moe"]
FAMILIES["step3p5"] = FAMILIES["step3p7"]  # Step-3.7's text config keeps the Step-3.5 name

#: block class name -> its row.
BLOCKS: dict[str, Block] = {b.name: b for blocks in FAMILIES.values() for b in blocks}

#: Sparse MoE block classes smoe recognises but cannot run exactly: class name -> the missing
#: feature. :func:`smoe.hf.patch` refuses a model containing one, naming it.
REFUSED: dict[str, str] = {
    "HYV4MoE": "its experts use a clamped SwiGLU without gpt-oss's alpha and +1 "
               "(silu(min(gate, limit)) * clamp(up, -limit, limit)), which no smoe activation "
               "computes",
    "Glm5NextTextMoE": "its experts use a clamped SwiGLU without gpt-oss's alpha and +1 "
                       "(silu(min(gate, swiglu_limit)) * clamp(up, -limit, limit)), which no "
                       "smoe activation computes",
    "DeepseekV4SparseMoeBlock": "its experts use a clamped SwiGLU (silu(min(gate, swiglu_limit)) "
                                "* clamp(up, -limit, limit)) that no smoe activation computes, "
                                "and its hash_moe layers choose experts from a fixed token-id "
                                "table (hash routing) that smoe's router does not have",
    "NemotronHMoE": "its experts are non-gated squared-ReLU MLPs (relu2), an activation smoe "
                    "does not have, optionally behind latent down/up projections "
                    "(moe_latent_size) that smoe's layer does not model",
    "LongcatFlashMoE": "it routes tokens to zero-computation (identity) experts "
                       "(zero_expert_num) alongside the real ones, which smoe's layer does not "
                       "have",
    "Gemma4TextRouter": "its router RMS-normalises and rescales its input (learned scale) and "
                        "multiplies each routing weight by a learned per-expert scale, and its "
                        "experts run inside the decoder layer next to a dense MLP rather than in "
                        "a sparse MoE block",
    "DiffusionGemmaTextRouter": "its router RMS-normalises and rescales its input (learned scale) "
                                "and multiplies each routing weight by a learned per-expert "
                                "scale, and its experts run inside the decoder layer next to a "
                                "dense MLP rather than in a sparse MoE block",
    "InklingMoE": "its shared experts are weighted per token by the router (their sigmoid "
                  "scores normalised together with the routed top-K), where smoe's shared "
                  "expert is unweighted or gated by its own linear",
    "Inkling2SparseMoeBlock": "its experts use a soft-capped SwiGLU (softcap(gate) * "
                              "sigmoid(gate) * softcap(up), in float32), which no smoe "
                              "activation computes",
    "MiniMaxM3VLSparseMoeBlock": "its shared expert stores gate and up in one fused Linear "
                                 "(gate_up_proj) with gpt-oss's clamped SwiGLU, which smoe's "
                                 "shared expert (separate gate/up projections, the routed "
                                 "experts' activation) cannot bind without a copy",
    "MuseSparkMoE": "its experts run in a projected latent width (pre_expert_proj, a centred "
                    "RMS norm, post_expert_proj) and normalise each expert's output before "
                    "weighting (post_expert_norm), which smoe's layer does not model",
    "ZayaSparseMoeBlock": "its router is an MLP (down-projection, RMS norm, two GELU layers) "
                          "whose state is carried from layer to layer, with an extra "
                          "no-expert class; smoe's router is a single linear",
    "OpenAIPrivacyFilterMLP": "its experts compute in float32 whatever the model's dtype (and "
                              "divide the routing weights by top_k, multiplying the output "
                              "back), which smoe's experts, computing in the model's dtype, "
                              "do not reproduce",
    "DogeCDMoE": "its experts are product-key retrieval experts (one up/down embedding row per "
                 "expert, chosen by a product-key top-K over two sub-key halves), which smoe's "
                 "layer does not have",
    "NllbMoeSparseMLP": "it is encoder-decoder routing with expert capacity and token dropping "
                        "(a top-2 router with expert_capacity, batch-prioritised routing and a "
                        "sampled or random second expert), which smoe's dropless layer does "
                        "not reproduce",
    "SwitchTransformersSparseMLP": "it is encoder-decoder top-1 routing with expert capacity "
                                   "and token dropping (expert_capacity) over non-gated "
                                   "ReLU experts, which smoe's dropless layer does not "
                                   "reproduce",
    "VitPoseBackboneMoeMLP": "it has no routed experts: each sample's expert is picked by its "
                             "dataset index (an input), not by a router",
}

#: ``model_type`` -> why a family listed by MoE searches has no routed experts at all (patch
#: says so instead of the generic "no supported block" message).
NO_ROUTED_EXPERTS: dict[str, str] = {
    "bamba": "Bamba's decoder layers are Mamba-2 or attention layers with one dense MLP "
             "(num_experts is fixed to 1): there are no routed experts",
}

#: The ``model_type`` of every family :func:`smoe.hf.patch` accepts.
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(sorted(FAMILIES))
