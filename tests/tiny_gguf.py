"""A tiny chat model built inside the tests: a real GGUF of the ``llama`` architecture that the
real llama.cpp loads, with its own SentencePiece vocabulary, chat template and end-of-turn token.

Its weights are random (seeded), so its text is noise, with one exception written into the
weights on purpose: after a newline, greedy decoding says ``TinyModel.reply`` and then the
end-of-turn token. A chat prompt ends with the template's generation prompt, which ends with a
newline, so a greedy chat reply is known in advance, and a test can tell whether generation
stopped at the end-of-turn token (it says ``reply`` and stops) or ran past it (noise follows).

How: the residual stream has a few *chain* dimensions. The newline and each reply word have a
one-hot embedding on a chain dimension of their own, and the output row of the next word (of
the end-of-turn token after the last word) reads that dimension. Every other token embeds at
random on the remaining dimensions, and no layer writes into the chain dimensions (their rows
of ``attn_output`` and ``ffn_down`` are zero), so only the last token decides whether the chain
goes on, and noise never enters it. The layers still run in full (attention over the context,
grouped-query heads, SwiGLU), so the test exercises llama.cpp's real compute path.

The end-of-turn token is named in ``tokenizer.ggml.eot_token_id``; its text matches none of
llama.cpp's built-in end-of-turn names, so llama.cpp warns at load ("special_eot_id is not in
special_eog_ids") and adds it to the end-of-generation set from the metadata alone.

This lives in ``tests/`` because only tests need it: the ``gguf`` writer is a test dependency.
Building the file takes a few milliseconds and it is about 0.5 MB.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Its own template, in its own markers (no other model uses them): turns between
# <|tiny_start|>ROLE and <|tiny_end|>; unknown roles are refused with raise_exception.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('tiny: unknown role ' ~ message['role']) }}"
    "{% endif %}"
    "<|tiny_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|tiny_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|tiny_start|>assistant\n{% endif %}"
)

# The reply words, as SentencePiece pieces (U+2581 is SentencePiece's space).
_REPLY_PIECES = ("\u2581Hello", "\u2581from", "\u2581the", "\u2581tiny", "\u2581model!")

_N_EMBD = 64
_N_HEAD = 4
_N_HEAD_KV = 2
_N_FF = 128
_N_LAYER = 2
_N_CTX_TRAIN = 2048
_CHAIN_SCALE = 50.0  # the chain tokens' embedding: dominates the residual stream
_CHAIN_LOGIT = 4.0  # the chain output rows' weight: a logit near 4 x sqrt(n_embd) = 32


@dataclass(frozen=True)
class TinyModel:
    """A built tiny GGUF and what a test needs to know about it."""

    path: Path
    chat_template: str | None  # as written to tokenizer.chat_template (None: no template)
    bos_id: int
    eos_id: int
    eot_id: int  # <|tiny_end|>, the end of a turn
    eot_in_metadata: bool  # whether tokenizer.ggml.eot_token_id names it (it is then EOG)
    reply: str  # what a greedy chat reply says before the end-of-turn token
    n_vocab: int


def _vocabulary() -> tuple[list[str], list[float], list[int], dict[str, int]]:
    from gguf import TokenType

    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []

    def add(text: str, kind: int, score: float = 0.0) -> None:
        tokens.append(text)
        scores.append(score)
        types.append(int(kind))

    add("<unk>", TokenType.UNKNOWN)
    add("<s>", TokenType.CONTROL)
    add("</s>", TokenType.CONTROL)
    add("<|tiny_start|>", TokenType.CONTROL)
    add("<|tiny_end|>", TokenType.CONTROL)
    for b in range(256):  # byte fallback: llama.cpp's SPM tokenizer needs all 256
        add(f"<0x{b:02X}>", TokenType.BYTE)
    # Pieces SentencePiece merges into: single characters, then "▁x" pairs; higher score
    # merges first. Enough for ordinary English text to use pieces rather than bytes.
    for ch in string.ascii_letters + string.digits + string.punctuation + "\u2581":
        add(ch, TokenType.NORMAL, -10.0)
    for ch in string.ascii_lowercase + string.ascii_uppercase:
        add("\u2581" + ch, TokenType.NORMAL, -5.0)
    for piece in _REPLY_PIECES:
        add(piece, TokenType.NORMAL, -1.0)
    ids = {t: i for i, t in enumerate(tokens)}
    assert len(ids) == len(tokens), "duplicate pieces in the tiny vocabulary"
    return tokens, scores, types, ids


def build_tiny_gguf(
    path: str | Path,
    *,
    seed: int = 0,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
    eot_in_metadata: bool = True,
) -> TinyModel:
    """Write the tiny model to ``path`` and describe it.

    ``chat_template=None`` leaves ``tokenizer.chat_template`` out (a model without a template);
    ``eot_in_metadata=False`` leaves out ``tokenizer.ggml.eot_token_id``, so llama.cpp does not
    know that ``<|tiny_end|>`` ends a turn (its name matches none of llama.cpp's built-in guesses).
    """
    import gguf

    path = Path(path)
    tokens, scores, types, ids = _vocabulary()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    chain = ["<0x0A>", *_REPLY_PIECES]  # newline, then the reply words
    n_chain = len(chain)
    free = slice(n_chain, _N_EMBD)  # the dimensions noise lives on
    n_free = _N_EMBD - n_chain

    embd = np.zeros((n_vocab, _N_EMBD), np.float32)
    out = np.zeros((n_vocab, _N_EMBD), np.float32)
    chain_ids = {ids[p] for p in chain}
    noise_rows = [i for i, t in enumerate(types) if i not in chain_ids]
    embd[noise_rows, free] = rng.standard_normal((len(noise_rows), n_free))
    # Noise is predicted among the ordinary pieces only (bytes and control tokens keep zero
    # rows, so greedy noise never picks them and stays printable ASCII).
    normal = [i for i, t in enumerate(types) if t == gguf.TokenType.NORMAL and i not in chain_ids]
    out[normal, free] = rng.standard_normal((len(normal), n_free)) * 0.5
    for dim, piece in enumerate(chain):
        embd[ids[piece], dim] = _CHAIN_SCALE
        nxt = ids[chain[dim + 1]] if dim + 1 < n_chain else ids["<|tiny_end|>"]
        out[nxt, dim] = _CHAIN_LOGIT

    head_dim = _N_EMBD // _N_HEAD
    n_kv = head_dim * _N_HEAD_KV

    def dense(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-chat-test")
    w.add_context_length(_N_CTX_TRAIN)
    w.add_embedding_length(_N_EMBD)
    w.add_block_count(_N_LAYER)
    w.add_feed_forward_length(_N_FF)
    w.add_head_count(_N_HEAD)
    w.add_head_count_kv(_N_HEAD_KV)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(ids["<unk>"])
    w.add_bos_token_id(ids["<s>"])
    w.add_eos_token_id(ids["</s>"])
    if eot_in_metadata:
        w.add_eot_token_id(ids["<|tiny_end|>"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", np.ones(_N_EMBD, np.float32))
    w.add_tensor("output.weight", out)
    for i in range(_N_LAYER):
        attn_out = dense(_N_EMBD, _N_EMBD)
        ffn_down = dense(_N_EMBD, _N_FF)
        attn_out[:n_chain] = 0.0  # no layer writes into the chain dimensions
        ffn_down[:n_chain] = 0.0
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(_N_EMBD, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", dense(_N_EMBD, _N_EMBD))
        w.add_tensor(f"blk.{i}.attn_k.weight", dense(n_kv, _N_EMBD))
        w.add_tensor(f"blk.{i}.attn_v.weight", dense(n_kv, _N_EMBD))
        w.add_tensor(f"blk.{i}.attn_output.weight", attn_out)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(_N_EMBD, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", dense(_N_FF, _N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_up.weight", dense(_N_FF, _N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_down.weight", ffn_down)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return TinyModel(
        path=path,
        chat_template=chat_template,
        bos_id=ids["<s>"],
        eos_id=ids["</s>"],
        eot_id=ids["<|tiny_end|>"],
        eot_in_metadata=eot_in_metadata,
        reply="".join(_REPLY_PIECES).replace("\u2581", " "),
        n_vocab=n_vocab,
    )
