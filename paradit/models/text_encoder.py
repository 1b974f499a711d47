"""The text encoder: transformers' UMT5EncoderModel and a tokenizer, Wan's way.

The prompt is cleaned (paradit.prompts: HTML entities, whitespace; ftfy where installed), tokenised
to at most text_len tokens (right padding, EOS kept under truncation), encoded with the attention
mask, trimmed to its real length and zero-padded back to text_len: the original Wan code's convention
(wan/modules/t5.py, tokenizers.py); cross-attention then sees all text_len positions.

`TextEncoder.embed` is what a request calls: each prompt encoded alone (so that its embedding does
not depend on the prompts it came with) and kept in a small LRU in host memory, so that a repeated
prompt (the default negative prompt above all) is not encoded again. `warm_up` encodes the default
negative prompt at start-up (paradit.checkpoint, beside the weight reads): the first call's costs
(cuBLAS handles and workspaces, kernel loading and selection, allocator growth) are paid there, and
a request with the default negative prompt encodes its own prompt only.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from paradit.prompts import clean_prompt

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


class TextEncoder:
    CACHED_PROMPTS = 8   # embeddings kept (host memory, text_len x d_model fp32: 8 MB each for umT5-XXL)

    def __init__(self, model: UMT5EncoderModel, tokenizer, text_len: int, device="cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer, self.text_len, self.device = tokenizer, text_len, torch.device(device)
        self.tokenizer.padding_side = "right"  # the trim below keeps each prompt's first tokens
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()   # prompt -> (1, text_len, d_model), LRU

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
        return out.mul_(mask[..., None])  # trim to the real length, zero-pad to text_len (in place: a fresh tensor)

    def embed(self, prompts: list[str], on_device=contextlib.nullcontext) -> torch.Tensor:
        """encode(prompts) for a request, on the device: each prompt encoded alone, or taken from
        the LRU of the last CACHED_PROMPTS prompts. on_device: the context the model runs in (an
        offloaded text encoder's copy to the GPU), entered only where a prompt is not cached."""
        fresh = {p: None for p in prompts if p not in self.cache}
        if fresh:
            with on_device():
                for p in fresh:
                    fresh[p] = self.encode([p])                 # on the device: used from there
                    self.cache[p] = fresh[p].cpu()
        for p in dict.fromkeys(prompts):
            self.cache.move_to_end(p)
        out = torch.cat([self.cache[p].to(self.device) if fresh.get(p) is None else fresh[p] for p in prompts])
        while len(self.cache) > self.CACHED_PROMPTS:
            self.cache.popitem(last=False)
        return out

    def warm_up(self, prompt: str) -> float:
        """embed([prompt]) now (start-up: the default negative prompt), on this encoder's device;
        returns the seconds taken, the device synchronised."""
        t0 = time.perf_counter()
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            self.embed([prompt])
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()
        return time.perf_counter() - t0

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
