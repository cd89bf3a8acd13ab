"""The character tokenizer of the arithmetic task, built offline with ``tokenizers``.

Every character of :data:`CHARS` is one token; :data:`SPECIALS` come first (``<pad>`` = 0,
``<bos>`` = 1, ``<eos>`` = 2, ``<mask>`` = 3). The post-processor prepends ``<bos>`` to every
encoded text. Load a saved copy with ``PreTrainedTokenizerFast.from_pretrained`` (or
:func:`tiltsample.targets.hf.load_tokenizer`), **never** ``AutoTokenizer`` — in a folder with a
Qwen2 ``config.json`` the latter returns a Qwen2 tokenizer that drops spaces and newlines.
"""

from __future__ import annotations

from typing import Any

SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<mask>")
CHARS: str = "0123456789+-=#\n "
PAD_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3
VOCAB: dict[str, int] = {t: i for i, t in enumerate((*SPECIALS, *CHARS))}


def build_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` over :data:`CHARS` with the special tokens of :data:`SPECIALS`.

    WordLevel model, a ``Split`` pre-tokenizer on the Oniguruma pattern ``(?m:.)`` (one piece per
    character, newline included; the ``(?s:.)`` spelling raises), a ``Fuse`` decoder and a template
    post-processor that adds ``<bos>``. Right padding.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?m:.)"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        mask_token="<mask>",
        padding_side="right",
    )
