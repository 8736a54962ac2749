"""Tiny random-weight models for the test suite (transformers 5, fully offline).

Each ``build_*`` function writes a complete checkpoint (config + weights, processor
or tokenizer, generation config) into ``path`` and returns ``str(path)``. They reload
with ``AutoProcessor`` + ``AutoModelForImageTextToText`` (the VLMs) or ``AutoTokenizer``
+ ``AutoModelForCausalLM`` (``build_causal_lm``). A build takes ~0.05 s once transformers and
the model module are imported (~2 s cold), the checkpoint is 150 KB-1.1 MB, and everything is
seeded: the same builder always writes byte-identical weights, hence the same greedy captions.

Random weights emit junk, so the outputs are shaped instead:

* Every VLM uses a small word-level vocabulary made of the model's special tokens,
  ``PROMPT_WORDS`` (role names, common prompt words, punctuation) and ``CAPTION_WORDS``.
* The saved ``GenerationConfig`` (greedy, ``max_new_tokens=12``, ``min_new_tokens=4``)
  suppresses every token except ``CAPTION_WORDS`` and EOS. A caption is therefore never
  empty and consists of ``CAPTION_WORDS`` only: a word from the prompt, a role name or a
  special token in a caption means the caller decoded more than the generated part.

Assert on structure (non-empty, words from ``CAPTION_WORDS``, batched == unbatched),
never on wording.

Family caveats (see the builders): BLIP's ``generate`` ignores generation_config.json (the
caption constraint is baked into its LM-head bias instead); Florence-2 batches contain
``<pad>`` after ``</s>`` that ``post_process_generation`` does not remove; PaliGemma (no chat
template) builds no input ids without a text prompt, so give it one (e.g. "caption en").
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, PreTrainedTokenizerFast

SEED = 0
INIT_STD = 0.3  # see _randomize
MAX_NEW_TOKENS = 12
MIN_NEW_TOKENS = 4

# The only words a tiny VLM can generate.
CAPTION_WORDS = (
    "red", "green", "blue", "yellow", "orange", "purple", "black", "white",
    "cat", "dog", "bird", "horse", "tree", "house", "car", "boat", "bridge",
    "sky", "river", "mountain", "flower", "street", "beach", "field", "sunset",
    "forest", "lake", "garden", "road", "cloud", "snow", "rock", "window",
)

# In the vocabulary (so prompts and chat roles tokenize to real ids) but never generated.
PROMPT_WORDS = (
    "user", "assistant", "system", "User", "Assistant", "System", "USER", "ASSISTANT", "SYSTEM",
    "You", "you", "are", "a", "an", "helpful", "Describe", "describe", "this", "the", "The",
    "image", "Image", "picture", "photo", "in", "detail", "detailed", "caption", "Caption",
    "Write", "write", "What", "what", "does", "is", "shown", "with", "paragraph", "of", "one",
    "sentence", "short", "and", "to", "it", ":", ".", ",", "?", "!",
)


def _seed() -> None:
    torch.manual_seed(SEED)


def _randomize(model, std: float | None = None) -> None:
    """Re-draw every matrix (linear, conv, embedding) with a large std.

    With the library default (0.02, BLIP vision even 1e-10) a tiny random model ignores its
    input: every image gets the same caption, often one word repeated. Larger weights make
    captions depend on the image, so a test can tell images apart (and spot a batch mix-up).
    1-D parameters (norms, biases) keep their defaults.
    """
    std = INIT_STD if std is None else std
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, std)


def _word_tokenizer(
    specials: list[str],
    *,
    unk: str,
    bos: str | None = None,
    eos: str | None = None,
    pad: str | None = None,
    prepend_bos: bool = False,
    post_processor=None,
    extra_special_tokens: dict[str, str] | None = None,
    extra_words: tuple[str, ...] = (),
    **kwargs,
) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over ``specials + PROMPT_WORDS + extra_words + CAPTION_WORDS`` (ids in that order).

    ``extra_words`` are family-specific prompt words (e.g. PaliGemma's "en"): in the vocabulary, never generated.
    """
    vocab: dict[str, int] = {}
    for token in (*specials, *PROMPT_WORDS, *extra_words, *CAPTION_WORDS):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if prepend_bos:  # Llama-style tokenizers add BOS themselves; chat templates then omit it.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    elif post_processor is not None:
        tok.post_processor = post_processor
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=extra_special_tokens or {},
        **kwargs,
    )


def _caption_only_suppress(tokenizer, keep: tuple[int, ...]) -> list[int]:
    """Every id of the tokenizer except CAPTION_WORDS and ``keep`` (EOS)."""
    allowed = set(tokenizer.convert_tokens_to_ids(list(CAPTION_WORDS))) | set(keep)
    return [i for i in range(len(tokenizer)) if i not in allowed]


def _generation_config(tokenizer, *, eos_id: int, pad_id: int, suppress: list[int] | None = None, **kwargs):
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        min_new_tokens=MIN_NEW_TOKENS,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        suppress_tokens=suppress if suppress is not None else _caption_only_suppress(tokenizer, (eos_id,)),
        **kwargs,
    )


def _save(path, model, processor, generation_config) -> str:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config = generation_config
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _tiny_llama(vocab_size: int, *, bos_id, eos_id, pad_id, **kwargs) -> dict:
    return dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **kwargs,
    )


# --------------------------------------------------------------------------------------
# Florence-2 (native `florence2` type: DaViT vision tower + BART encoder-decoder)
# --------------------------------------------------------------------------------------

# Like the post_processor_config that real Florence-2 checkpoints ship in processor_config.json;
# without it `post_process_generation` raises "Unsupported parse task".
FLORENCE2_POST_PROCESSOR_CONFIG = {
    "ocr": {
        "pattern": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
        "area_threshold": 0.0,
    },
    "phrase_grounding": {"banned_grounding_tokens": ["it", "I", "me", "you", "the image", "the picture"]},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}


def build_florence2(path) -> str:
    from transformers import CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    _seed()
    # BART ids: <s>=0 <pad>=1 </s>=2 <unk>=3
    tokenizer = _word_tokenizer(
        ["<s>", "<pad>", "</s>", "<unk>", "<image>"],
        unk="<unk>", bos="<s>", eos="</s>", pad="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    bos_id, pad_id, eos_id = tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    config = Florence2Config(
        text_config=dict(
            model_type="bart",
            vocab_size=len(tokenizer),
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=256,
            bos_token_id=bos_id,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            decoder_start_token_id=eos_id,
            forced_eos_token_id=eos_id,
        ),
        vision_config=dict(
            depths=[1],
            patch_size=[7],
            patch_stride=[4],
            patch_padding=[3],
            patch_prenorm=[False],
            embed_dim=[32],
            num_heads=[4],
            num_groups=[4],
            window_size=4,
            projection_dim=32,
            drop_path_rate=0.0,
        ),
        image_token_id=image_token_id,
    )
    model = Florence2ForConditionalGeneration(config).eval()
    _randomize(model)

    image_processor = CLIPImageProcessor(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=False
    )
    # Make </s> likelier (its row of the tied embedding / LM head x8), so that some captions in a
    # batch end early and the batch output carries trailing <pad> tokens after "</s>", as with real
    # checkpoints. `post_process_generation` strips <s> and </s> but NOT <pad>; callers must.
    with torch.no_grad():
        model.get_output_embeddings().weight[eos_id] *= 8.0
    # The processor expands <image> to `image_seq_length` copies; it must equal the number of
    # projected vision features (8x8 patches + 1 pooled token = 65 at 32 px).
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32)).pooler_output
    image_processor.image_seq_length = feats.shape[1]
    processor = Florence2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_additional_image_tokens=0,
        post_processor_config=FLORENCE2_POST_PROCESSOR_CONFIG,
    )
    assert len(tokenizer) == model.config.text_config.vocab_size  # the processor added no tokens

    # Real Florence-2 output is "</s><s>caption</s>": decoder starts at </s>, BOS is forced first.
    # BOS is banned via bad_words_ids (not suppress_tokens) because SuppressTokens runs after
    # ForcedBOS in the logits-processor list and would mask the forced token too.
    generation_config = _generation_config(
        tokenizer,
        eos_id=eos_id,
        pad_id=pad_id,
        suppress=[i for i in _caption_only_suppress(tokenizer, (eos_id,)) if i != bos_id],
        bad_words_ids=[[bos_id]],
        bos_token_id=bos_id,
        decoder_start_token_id=eos_id,
        forced_bos_token_id=bos_id,
        forced_eos_token_id=eos_id,
    )
    return _save(path, model, processor, generation_config)


# --------------------------------------------------------------------------------------
# Qwen2.5-VL
# --------------------------------------------------------------------------------------

# Same structure as the real Qwen2.5-VL-Instruct template (default system turn, ChatML).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_5_vl(path) -> str:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    _seed()
    tokenizer = _word_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
         "<|image_pad|>", "<|video_pad|>", "<unk>"],
        unk="<unk>", eos="<|im_end|>", pad="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    processor = Qwen2_5_VLProcessor(
        # 64x48 px -> 56x56 -> 4x4 patches of 14 -> 2x2 = 4 image tokens after the 2x2 merge
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        video_processor=Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        tokenizer=tokenizer,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            # mrope sections must sum to head_dim / 2 = 4
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            bos_token_id=pad_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=28,
            out_hidden_size=32,
            fullatt_block_indexes=[0],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _randomize(model)
    generation_config = _generation_config(tokenizer, eos_id=eos_id, pad_id=pad_id, bos_token_id=pad_id)
    return _save(path, model, processor, generation_config)


# --------------------------------------------------------------------------------------
# Qwen3-VL
# --------------------------------------------------------------------------------------

# Same structure as the real Qwen3-VL-Instruct template (tools and assistant tool calls left out): unlike
# Qwen2.5-VL there is NO default system turn (a system turn only when given, its content string or text
# parts), ChatML turns, images as <|vision_start|><|image_pad|><|vision_end|>, and the Instruct generation
# prompt "<|im_start|>assistant\n" (no <think> block; that is the Thinking variant).
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}"
    "{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- set image_count = namespace(value=0) %}"
    "{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{{- '<|im_start|>' + message.role + '\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def build_qwen3_vl(path) -> str:
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    _seed()
    tokenizer = _word_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
         "<|image_pad|>", "<|video_pad|>", "<unk>"],
        unk="<unk>", eos="<|im_end|>", pad="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    # Qwen3-VL: patch 16, merge 2 (factor 32). 64x48 px -> 64x64 -> 4x4 patches -> 2x2 = 4 image tokens;
    # larger test images (up to 128x128 px) get up to 16, so a batch of mixed sizes needs padding.
    patch, merge = 16, 2
    size = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=patch, merge_size=merge, size=size),
        video_processor=Qwen3VLVideoProcessor(patch_size=patch, merge_size=merge, size=size),
        tokenizer=tokenizer,
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
            # interleaved mrope sections must sum to head_dim / 2 = 4
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True},
            bos_token_id=pad_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            patch_size=patch,
            spatial_merge_size=merge,
            temporal_patch_size=2,
            out_hidden_size=32,
            num_position_embeddings=16,  # a 4x4 grid, interpolated to the image's patch grid
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen3VLForConditionalGeneration(config).eval()
    _randomize(model)
    generation_config = _generation_config(tokenizer, eos_id=eos_id, pad_id=pad_id, bos_token_id=pad_id)
    return _save(path, model, processor, generation_config)


# --------------------------------------------------------------------------------------
# SmolVLM (Idefics3 family)
# --------------------------------------------------------------------------------------

# Same as the real SmolVLM-Instruct template: "User:<image>text<end_of_utterance>\nAssistant:".
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_smolvlm(path) -> str:
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers import SmolVLMVideoProcessor

    _seed()
    tokenizer = _word_tokenizer(
        ["<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>",
         "<image>", "<unk>"],
        unk="<unk>", bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>",
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )
    image_size, patch, scale = 32, 8, 2
    image_seq_len = (image_size // patch) ** 2 // scale**2  # 4 tokens per image
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(
            do_image_splitting=False,
            size={"longest_edge": image_size},
            max_image_size={"longest_edge": image_size},
        ),
        video_processor=SmolVLMVideoProcessor(),
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    bos_id, eos_id, pad_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    config = SmolVLMConfig(
        text_config=_tiny_llama(len(tokenizer), bos_id=bos_id, eos_id=eos_id, pad_id=pad_id),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch,
        ),
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=pad_id,
    )
    model = SmolVLMForConditionalGeneration(config).eval()
    _randomize(model)
    generation_config = _generation_config(tokenizer, eos_id=eos_id, pad_id=pad_id, bos_token_id=bos_id)
    return _save(path, model, processor, generation_config)


# --------------------------------------------------------------------------------------
# Janus (native `janus` type)
# --------------------------------------------------------------------------------------

# Same structure as the real Janus-Pro template: "<|User|>: text\n<image_placeholder>\n\n<|Assistant|>:".
JANUS_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set role = message['role'] | lower %}"
    "{% if role == 'user' %}<|User|>: {% elif role == 'assistant' %}<|Assistant|>: "
    "{% else %}{{ message['role'] | capitalize }}: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{% if not loop.first %}{{ '\n' }}{% endif %}<image_placeholder>"
    "{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if role == 'assistant' %}<｜end▁of▁sentence｜>{% else %}{{ '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


def build_janus(path) -> str:
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusImageProcessor, JanusProcessor

    _seed()
    bos, eos, pad = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
    tokenizer = _word_tokenizer(
        [bos, eos, pad, "<unk>", "<image_placeholder>", "<begin_of_image>", "<end_of_image>",
         "<|User|>", "<|Assistant|>"],
        unk="<unk>", bos=bos, eos=eos, pad=pad, prepend_bos=True,
        extra_special_tokens={
            "image_token": "<image_placeholder>",
            "boi_token": "<begin_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )
    image_size, patch = 32, 8
    num_image_tokens = (image_size // patch) ** 2  # 16
    processor = JanusProcessor(
        image_processor=JanusImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        chat_template=JANUS_CHAT_TEMPLATE,
        num_image_tokens=num_image_tokens,
        use_default_system_prompt=False,
    )
    bos_id, eos_id, pad_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    config = JanusConfig(
        text_config=_tiny_llama(len(tokenizer), bos_id=bos_id, eos_id=eos_id, pad_id=pad_id),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            mlp_ratio=2,
            image_size=image_size,
            patch_size=patch,
            projection_dim=32,
            num_image_tokens=num_image_tokens,
            depth=1,
        ),
        vq_config=dict(
            embed_dim=8,
            num_embeddings=16,
            latent_channels=8,
            base_channels=32,  # GroupNorm(32 groups): cannot be smaller
            channel_multiplier=[1, 1],
            num_res_blocks=1,
            projection_dim=16,
            image_token_embed_dim=32,
            num_patches=4,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"),
    )
    model = JanusForConditionalGeneration(config).eval()
    _randomize(model)
    generation_config = _generation_config(tokenizer, eos_id=eos_id, pad_id=pad_id, bos_token_id=bos_id)
    return _save(path, model, processor, generation_config)


# --------------------------------------------------------------------------------------
# LLaVA (1.5 style: CLIP vision + Llama)
# --------------------------------------------------------------------------------------

# Same as the llava-hf/llava-1.5 template: "USER: <image>\ntext ASSISTANT:"; a system turn is
# rendered as bare text.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _llava_tokenizer():
    """The LLaVA family's word tokenizer: Llama's specials and the <image> placeholder."""
    return _word_tokenizer(
        ["<unk>", "<s>", "</s>", "<image>", "<pad>"],
        unk="<unk>", bos="<s>", eos="</s>", pad="<pad>", prepend_bos=True,
        extra_special_tokens={"image_token": "<image>"},
    )


def _tiny_clip_vision(image_size: int, patch: int) -> dict:
    return dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, projection_dim=32,
                num_hidden_layers=2, num_attention_heads=4, image_size=image_size, patch_size=patch)


def build_llava(path) -> str:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    _seed()
    tokenizer = _llava_tokenizer()
    image_size, patch = 32, 8
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        # 4x4 patches + CLS, CLS dropped by the "default" strategy -> 16 image tokens
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    bos_id, eos_id, pad_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    config = LlavaConfig(
        vision_config=_tiny_clip_vision(image_size, patch),
        text_config=_tiny_llama(len(tokenizer), bos_id=bos_id, eos_id=eos_id, pad_id=pad_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    _randomize(model)
    generation_config = _generation_config(tokenizer, eos_id=eos_id, pad_id=pad_id, bos_token_id=bos_id)
    return _save(path, model, processor, generation_config)


# --------------------------------------------------------------------------------------
# LLaVA-NeXT (CLIP vision + Llama, the image tiled on a grid of pinpoints)
# --------------------------------------------------------------------------------------

# Tiling sides of the tiny LLaVA-NeXT: the image is resized to the best of these grids (height, width), cut into
# 32 px tiles, and a 32 px view of the whole image is added. The real checkpoints use [[336, 672], ...].
LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def build_llava_next(path) -> str:
    """Like llava-hf/llava-v1.6-*: the LLaVA-1.5 chat template; the number of image tokens depends on the image's
    size (the processor counts the tiles and the unpadded rows), so every image has its own prompt length."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    _seed()
    tokenizer = _llava_tokenizer()
    image_size, patch = 32, 8
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        ),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    bos_id, eos_id, pad_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    config = LlavaNextConfig(
        vision_config=_tiny_clip_vision(image_size, patch),
        text_config=_tiny_llama(len(tokenizer), bos_id=bos_id, eos_id=eos_id, pad_id=pad_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    _randomize(model)
    generation_config = _generation_config(tokenizer, eos_id=eos_id, pad_id=pad_id, bos_token_id=bos_id)
    return _save(path, model, processor, generation_config)


# --------------------------------------------------------------------------------------
# BLIP captioning
# --------------------------------------------------------------------------------------

def build_blip(path) -> str:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    _seed()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    tokenizer = _word_tokenizer(
        specials,
        unk="[UNK]", bos="[DEC]", pad="[PAD]", eos="[SEP]",
        # BERT-style "[CLS] $A [SEP]" post-processor, as the real BLIP (BertTokenizer) has.
        post_processor=processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        ),
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    ids = tokenizer.convert_tokens_to_ids
    dec_id, sep_id, pad_id = ids("[DEC]"), ids("[SEP]"), ids("[PAD]")
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            encoder_hidden_size=32,
            intermediate_size=64,
            projection_dim=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=dec_id,
            eos_token_id=sep_id,
            sep_token_id=sep_id,
            pad_token_id=pad_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            projection_dim=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
        image_text_hidden_size=32,
    )
    model = BlipForConditionalGeneration(config).eval()
    _randomize(model)

    # BlipForConditionalGeneration.generate() calls `self.text_decoder.generate(...)`, which does
    # NOT use generation_config.json: the saved suppress/min/max settings apply only if the caller
    # passes them (e.g. `generation_config=model.generation_config` or `max_new_tokens=`). So the
    # constraint is also baked into the weights: a -1e4 bias on every non-caption token of the LM
    # head, [SEP] (the end token) included -> captions are CAPTION_WORDS only and never empty.
    # With no end token the length is the caller's max_new_tokens, else transformers' default
    # max_length (20 words after [DEC]).
    suppress = _caption_only_suppress(tokenizer, ())
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[suppress] = -1e4
    generation_config = _generation_config(
        tokenizer, eos_id=sep_id, pad_id=pad_id, bos_token_id=dec_id,
        suppress=_caption_only_suppress(tokenizer, (sep_id,)),
    )
    return _save(path, model, processor, generation_config)


# --------------------------------------------------------------------------------------
# PaliGemma (SigLIP vision + Gemma; no chat template, prompts like "caption en")
# --------------------------------------------------------------------------------------

def build_paligemma(path) -> str:
    """Like google/paligemma-3b-mix-224: no chat template, so the script treats it as a plain captioner.

    The processor turns a prompt into ``<image>*N <bos> prompt \\n`` itself and adds 1,024 ``<loc>`` and
    128 ``<seg>`` tokens to the tokenizer (plain added tokens, not special ones), so the model's vocabulary
    is sized from ``len(tokenizer)`` after the processor is built. Generated output starts with the prompt
    ids (decoder-only); "en" is in the vocabulary so "caption en" round-trips through decode.
    """
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessor

    _seed()
    # Gemma ids: <pad>=0 <eos>=1 <bos>=2 <unk>=3, then <image> (the real checkpoint has it at 257152)
    tokenizer = _word_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
        unk="<unk>", bos="<bos>", eos="<eos>", pad="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        extra_words=("en",),
    )
    image_size, patch = 32, 8
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // patch) ** 2  # 16 image tokens, one per patch
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    assert processor.chat_template is None  # as the real mix/pt checkpoints: no chat_template.json
    bos_id, eos_id, pad_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    vocab_size = len(tokenizer)  # after the processor's <loc>/<seg> tokens
    config = PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch,
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="gemma",
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=256,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=vocab_size,
        projection_dim=32,
        hidden_size=32,
        pad_token_id=pad_id,
    )
    model = PaliGemmaForConditionalGeneration(config).eval()
    _randomize(model)
    generation_config = _generation_config(tokenizer, eos_id=eos_id, pad_id=pad_id, bos_token_id=bos_id)
    return _save(path, model, processor, generation_config)


# --------------------------------------------------------------------------------------
# Tiny chat LM (text only), servable by `transformers serve`
# --------------------------------------------------------------------------------------

CAUSAL_LM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_causal_lm(path) -> str:
    """Tiny Qwen2 chat LM with a byte-level BPE tokenizer; output is lowercase letters and spaces.

    Byte-level BPE because AutoTokenizer reloads it as `Qwen2Tokenizer` (from the config's
    model_type), which re-applies Qwen2's own pre-tokenizer: harmless for byte-level BPE, while
    a WordLevel vocabulary gets mis-tokenized. Serve with
    `HF_HUB_OFFLINE=1 transformers serve <path> --host 127.0.0.1 --port P`; note the server raises
    max_new_tokens to 1024 unless the request sends `max_tokens` (this model rarely stops on its own).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _seed()
    # Byte-level BPE: the 256 byte symbols, a few merges; special tokens first.
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    tokenizer.chat_template = CAUSAL_LM_CHAT_TEMPLATE
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config).eval()
    _randomize(model)
    # Only lowercase ASCII letters, space ("Ġ") and the merged tokens may be generated, plus EOS.
    allowed = {eos_id} | {vocab[c] for c in "abcdefghijklmnopqrstuvwxyz"} | {vocab["Ġ"]}
    allowed |= {vocab[a + b] for a, b in merges}
    generation_config = _generation_config(
        tokenizer, eos_id=eos_id, pad_id=pad_id, bos_token_id=pad_id,
        suppress=[i for i in range(len(tokenizer)) if i not in allowed],
    )
    # Random weights never choose EOS, so every reply would be cut off at max_tokens
    # (finish_reason "length", which the script rejects). Counting the vowels as end tokens too makes
    # replies end on their own after min_new_tokens, as a real instruct model's do.
    generation_config.eos_token_id = [eos_id] + [vocab[c] for c in "aeiou"]
    return _save(path, model, tokenizer, generation_config)


VLM_BUILDERS = {
    "florence2": build_florence2,
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
    "smolvlm": build_smolvlm,
    "janus": build_janus,
    "llava": build_llava,
    "llava_next": build_llava_next,
    "blip": build_blip,
    "paligemma": build_paligemma,
}

__all__ = [
    "CAPTION_WORDS",
    "PROMPT_WORDS",
    "VLM_BUILDERS",
    "build_blip",
    "build_causal_lm",
    "build_florence2",
    "build_janus",
    "build_llava",
    "build_llava_next",
    "build_paligemma",
    "build_qwen2_5_vl",
    "build_qwen3_vl",
    "build_smolvlm",
]
