"""Text <-> ids, actions <-> 256 bins, action normalization, and the prompt.

Everything that maps between the robot's continuous world and the LLM's integer world lives here, so that
training (data.py) and serving (model.py, serve.py) share one implementation.

    python -c "from tokenizer import ActionTokenizer; print(ActionTokenizer().encode([0.0]*7))"

The numbers follow the original OpenVLA (prismatic/vla/action_tokenizer.py):
    normalized action in [-1, 1]  --np.digitize on 256 edges-->  d in 1..256  -->  token id = 32000 - d
    token id  -->  d = 32000 - id  -->  bin center k = clip(d - 1, 0, 254)  -->  value in [-0.996, 0.996]
"""

from types import SimpleNamespace

import numpy as np

N_ACTION_BINS = 256  # OpenVLA: n_action_bins in config.json
IGNORE_INDEX = -100  # label value that cross-entropy skips (patches, prompt, padding)
EMPTY_PIECE = "\u2581"  # SentencePiece's lone "▁": the space between "Out:" and the action tokens (29871 in Llama-2)
PAD_TOKEN = "<PAD>"  # added by OpenVLA to Llama-2's vocabulary -> id 32000
MAX_TEXT_TOKENS = 2048  # tokenizer.model_max_length of the release; the collator truncates to it


def build_prompt(instruction: str) -> str:
    """The released openvla-7b's inference prompt (vla-scripts/deploy.py), no trailing space; only lower-cased."""
    return f"In: What action should the robot take to {instruction.lower()}?\nOut:"


class ActionTokenizer:
    """256-bin uniform discretization of normalized actions onto the last 256 ids of the base vocabulary."""

    def __init__(self, vocab_size: int = 32000, n_bins: int = N_ACTION_BINS):
        self.vocab_size = vocab_size  # base vocabulary without <PAD> and padding rows: 32000 for Llama-2
        self.n_bins = n_bins
        self.bins = np.linspace(-1.0, 1.0, n_bins)  # 256 *edges*, float64
        # The original builds 255 centers from 256 edges: np.digitize yields 256 distinct values but decode has only
        # 255 centers, so the top two token ids decode to the same value (+0.996). Released checkpoints were trained
        # with exactly this mapping, so we keep it.
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0
        self.begin_idx = vocab_size - (n_bins + 1)  # 31743: action tokens are the ids > begin_idx (metric mask)

    def encode(self, actions) -> np.ndarray:
        """Normalized actions (..., D) -> token ids (..., D), int64 in [vocab_size - n_bins, vocab_size - 1]."""
        a = np.clip(np.asarray(actions, dtype=np.float64), -1.0, 1.0)
        return (self.vocab_size - np.digitize(a, self.bins)).astype(np.int64)  # digitize(1.0) = 256 -> 31744

    def decode(self, ids) -> np.ndarray:
        """Token ids (..., D) -> normalized actions (..., D), float64; non-action ids clip to the edge centers."""
        d = self.vocab_size - np.asarray(ids, dtype=np.int64)
        return self.bin_centers[np.clip(d - 1, 0, len(self.bin_centers) - 1)]


def normalize_actions(actions, stats: dict) -> np.ndarray:
    """BOUNDS_Q99 normalization to [-1, 1], OpenVLA's training setting (prismatic/vla/datasets/rlds/utils/
    data_utils.py).

    `stats` is one entry's "action" dict (q01, q99, min, max, mask). Dimensions whose mask is False (the gripper)
    pass through unchanged; dimensions with min == max become 0, as the original does.
    """
    # as the original's TF graph (rlds/utils/data_utils.py): float32, except q99 - q01 + 1e-8, which numpy computes in
    # float64 on the statistics before TF casts it; a value at q99 then gives 0.99999976, not 1.0 (another bin)
    a = np.asarray(actions, dtype=np.float32)
    q01, q99 = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    scaled = 2 * (a - q01.astype(np.float32)) / (q99 - q01 + 1e-8).astype(np.float32) - 1
    out = np.where(mask, np.clip(scaled, -1, 1), a)
    constant = np.asarray(stats["min"], np.float64) == np.asarray(stats["max"], np.float64)
    return np.where(constant, np.float32(0), out)


def unnormalize_actions(normalized, norm_stats: dict, unnorm_key: str) -> np.ndarray:
    """Inverse of BOUNDS_Q99 as predict_action computes it: 0.5 (x + 1)(q99 - q01) + q01 (the 1e-8 is not undone)."""
    s = norm_stats[unnorm_key]["action"]
    q01, q99 = np.asarray(s["q01"], dtype=np.float64), np.asarray(s["q99"], dtype=np.float64)
    mask = np.asarray(s.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    x = np.asarray(normalized, dtype=np.float64)
    return np.where(mask, 0.5 * (x + 1.0) * (q99 - q01) + q01, x)


def resolve_unnorm_key(norm_stats: dict, unnorm_key: str | None) -> str:
    """Pick the statistics entry: may be omitted only when there is exactly one (modeling_prismatic.py)."""
    keys = sorted(norm_stats)
    if unnorm_key is None:
        if len(keys) == 1:
            return keys[0]
        raise ValueError(f"this model has statistics for {len(keys)} datasets; pass unnorm_key= one of {keys}")
    if unnorm_key not in norm_stats:
        raise ValueError(f"unknown unnorm_key {unnorm_key!r}; this model knows {keys}")
    return unnorm_key


def action_dim(norm_stats: dict, unnorm_key: str) -> int:
    return len(norm_stats[unnorm_key]["action"]["q01"])


# Text tokenizer

class TextTokenizer:
    """The Llama-2 tokenizer as the `tokenizers` library runs it from tokenizer.json, with the few names of
    transformers' tokenizer API that OpenVLA uses (without importing transformers, which is most of a load)."""

    def __init__(self, backend):
        self.backend_tokenizer = backend
        self.bos_token_id, self.eos_token_id, self.pad_token_id = map(backend.token_to_id, ("<s>", "</s>", PAD_TOKEN))
        self.vocab_size = backend.get_vocab_size(with_added_tokens=False)  # 32000: without <PAD>

    def __call__(self, text: str, add_special_tokens=True):  # -> .input_ids, as transformers' BatchEncoding
        return SimpleNamespace(input_ids=self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def __len__(self):
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def decode(self, ids, skip_special_tokens=False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend_tokenizer.token_to_id(token)


def build_text_tokenizer() -> TextTokenizer:
    """A Llama-2-shaped character-level tokenizer built locally (no download), for small configs and the demo.

    Same ids as Llama-2 where OpenVLA depends on them: <unk> 0, <s> 1, </s> 2, bytes <0x00>..<0xFF> at 3..258
    ("\\n" = 13), "▁" alone at 29871, 32000 base entries, <PAD> = 32000, and the last 256 ids (the action tokens)
    are single rare characters. There are no merges: every character is one token, which is all a demo needs.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    ascii_chars = [chr(c) for c in range(33, 127)]  # printable ASCII after "▁" at 29871, as in Llama-2's layout
    fixed = {29871: EMPTY_PIECE, **{29872 + i: ch for i, ch in enumerate(ascii_chars)}}
    filler = (chr(c) for c in list(range(0x4E00, 0xA000)) + list(range(0xAC00, 0xD7A4)))  # CJK, then Hangul
    for i in range(259, 32000):
        vocab[fixed[i] if i in fixed else next(filler)] = i
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(EMPTY_PIECE), normalizers.Replace(" ", EMPTY_PIECE)])
    tok.decoder = decoders.Sequence([decoders.Replace(EMPTY_PIECE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>", PAD_TOKEN)])
    return TextTokenizer(tok)


def empty_piece_id(tokenizer) -> int:
    """The id of the lone "▁" piece (29871 for Llama-2), looked up rather than hard-coded."""
    return tokenizer.convert_tokens_to_ids(EMPTY_PIECE)


def training_example(tokenizer, action_tokenizer: ActionTokenizer, instruction: str, normalized_action):
    """input_ids and labels of one training frame, as the original's RLDSBatchTransform builds them.

    The original tokenizes "In: What action should the robot take to {lang}?\\nOut: " + action string + "</s>" and
    supervises the last action_dim + 1 tokens. Tokenizing the text part and appending the integer ids gives the same
    ids (the space after "Out:" is the lone "▁" piece, and each action character is one token) without relying on
    the action string re-tokenizing one token per dimension.
        input_ids = [BOS, prompt ..., "▁", a_1 ... a_D, EOS]      labels = -100 ... -100, a_1 ... a_D, EOS
    """
    prompt_ids = tokenizer(build_prompt(instruction) + " ").input_ids  # ends with "▁" (29871)
    action_ids = action_tokenizer.encode(normalized_action).tolist()
    input_ids = prompt_ids + action_ids + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(prompt_ids) + action_ids + [tokenizer.eos_token_id]
    return input_ids, labels
