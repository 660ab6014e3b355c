"""Teacher-signal caches on disk: the teacher runs once over a dataset and its Signal (dense
logits, or top-k log-probabilities with the tail mass, and tapped features) goes to checksummed,
sharded safetensors files that several machines can fill together and training reads back
memory-mapped, example by example.

Layout of a cache folder::

    manifest.json                      what the cache means: teacher, tokenizer, data, k, …
    parts/part-00000-of-00004.json     the shards one writer finished, with their checksums
    shards/shard-000000.safetensors    rows of examples [0, shard_size), and so on

Rows: an ``example`` cache keeps one row per example (a classifier's logits); a ``token`` cache
keeps one row per real token (``attention_mask`` 1) of each example, the teacher's next-token
distribution at that position. A row is either ``V`` dense logits (``k`` None) or the top-k:
token ids (uint16 when V ≤ 65,536), log-probabilities (``float32``, ``float16`` or ``q8``: one
byte, steps of 1/16 nat below the row's largest log-probability, kept in float16) and the tail
mass (the probability of all other tokens). With ``compression: zlib`` the top-k rows of a few
consecutive examples (``Encoding.block``) are deflated together, each row's entries sorted by
token id, the ids as gaps, bytes shuffled; a reader inflates only the blocks a batch needs.

Safety: a shard is written to a temporary file, synced and renamed, and only then recorded (with
its SHA-256) in its part's record, itself replaced atomically; a shard that is not recorded does
not exist for readers, so killing a writer at any moment leaves nothing that reads as valid but
is not. A rerun skips recorded shards. Readers check the manifest against what they are used
with and name the first field that differs, verify every shard's checksum, and refuse an
incomplete cache unless told to use what is there.
"""

from .codec import Encoding, decode_topk, topk_rows
from .format import (
    CHECKED_FIELDS,
    CacheError,
    CacheStatus,
    cache_meaning,
    cache_status,
    compare_meaning,
    config_fingerprint,
    data_fingerprint,
    parse_part,
    read_manifest,
    shard_records,
    tokenizer_fingerprint,
)
from .reader import CachedTeacher
from .writer import build_logit_cache, cached_or_live, write_cache

__all__ = [
    "CHECKED_FIELDS",
    "CacheError",
    "CacheStatus",
    "CachedTeacher",
    "Encoding",
    "build_logit_cache",
    "cache_meaning",
    "cache_status",
    "cached_or_live",
    "compare_meaning",
    "config_fingerprint",
    "data_fingerprint",
    "decode_topk",
    "parse_part",
    "read_manifest",
    "shard_records",
    "tokenizer_fingerprint",
    "topk_rows",
    "write_cache",
]
