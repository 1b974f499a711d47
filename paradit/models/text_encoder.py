"""The text encoder: transformers' UMT5EncoderModel and a tokenizer, Wan's way.

The prompt is cleaned (HTML entities, whitespace; ftfy where installed), tokenised to at most
text_len tokens (right padding, EOS kept under truncation), encoded with the attention mask,
trimmed to its real length and zero-padded back to text_len: the original Wan code's convention
(wan/modules/t5.py, tokenizers.py); cross-attention then sees all text_len positions.
"""
from __future__ import annotations

import html
import logging
import re

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

log = logging.getLogger("paradit")

# Words of the synthetic shape videos (colours, shapes, motions); enough for tiny and demo prompts.
WORDS = ("a an the of on in and with moving move moves going left right up down towards to slowly quickly "
         "red green blue yellow orange purple white black cyan magenta gray "
         "circle square triangle ball box shape disk ring cross star background plain over").split()


def word_tokenizer(words=WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built locally with the tokenizers library (no download)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def clean_prompt(text: str) -> str:
    """wan/modules/tokenizers.py's clean='whitespace': ftfy (if installed), HTML unescaped twice, spaces."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mojibake; plain prompts are unchanged by it
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    def __init__(self, model: UMT5EncoderModel, tokenizer, text_len: int, device="cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer, self.text_len, self.device = tokenizer, text_len, torch.device(device)
        self.tokenizer.padding_side = "right"  # the trim below keeps each prompt's first tokens

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, text_len, d_model) fp32, zero past each prompt's real length. A prompt longer than
        text_len tokens is cut to it, as the original Wan code does, with a warning that says so."""
        prompts = [clean_prompt(p) for p in prompts]
        for p, ids in zip(prompts, self.tokenizer(prompts, add_special_tokens=True).input_ids):
            if len(ids) > self.text_len:
                log.warning("the prompt %r has %d tokens and the text encoder takes %d: the last %d are cut "
                            "(shorten the prompt to keep them)", p[:60] + ("..." if len(p) > 60 else ""), len(ids),
                            self.text_len, len(ids) - self.text_len)
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.text_len,
                             truncation=True, add_special_tokens=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return out * mask[..., None]  # trim to the real length, zero-pad to text_len

    @classmethod
    def tiny(cls, text_dim: int, text_len: int, seed: int = 0, device="cpu", layers: int = 2) -> "TextEncoder":
        tokenizer = word_tokenizer()
        config = UMT5Config(vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=2 * text_dim,
                            num_layers=layers, num_heads=4, relative_attention_num_buckets=8,
                            relative_attention_max_distance=16, dropout_rate=0.0, feed_forward_proj="gated-gelu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = UMT5EncoderModel(config)
        return cls(model, tokenizer, text_len, device)

    @classmethod
    def from_pretrained(cls, folder, tokenizer_folder, text_len: int = 512, dtype=torch.bfloat16,
                        device="cpu", stats: dict | None = None, host=None) -> "TextEncoder":
        """transformers' save_pretrained folder, loaded as its from_pretrained would (the same tensors
        and dtypes, tied embeddings, the fp32 modules it keeps under fp16), but built on the meta device
        under paradit's BUILD_LOCK and read by paradit's reader, straight to `device`. host: as
        load_transformer's, for a text encoder kept in host memory (offload): host(model) gives the
        meta-built model its (pinned) host tensors, which the weights are read straight into."""
        from transformers import AutoTokenizer

        from paradit.models.loading import BUILD_LOCK, assign_weights, build_on_meta, index_folder, read_tensors
        config = UMT5Config.from_pretrained(folder)
        model = build_on_meta(lambda: UMT5EncoderModel(config))
        keep = set(model._keep_in_fp32_modules or []) if dtype == torch.float16 else set()
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or []) if dtype in (
            torch.float16, torch.bfloat16) else set()
        kept = lambda name: bool(keep.intersection(name.split(".")))  # noqa: E731
        into = None
        if host is not None:
            with BUILD_LOCK:            # still on the meta device: the dtypes the reader gives (ties kept)
                model.to(dtype)
                for name, module in model.named_modules():
                    if kept(name):
                        module.float()
            into = host(model)
        index = index_folder(folder)
        tensors = read_tensors(index, index.names, dtype, device, stats=stats, keep_fp32=kept, out=into)
        model = assign_weights(model, tensors, str(folder))
        return cls(model, AutoTokenizer.from_pretrained(tokenizer_folder), text_len, device)
