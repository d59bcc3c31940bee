"""A mask's PNG, deflated by a coder made for a 0/255 image.

A mask is a few long runs of 0 and 255 to a row. zlib (libvips' level 2) finds them by hashing
every byte and searching its window; this coder scans each row once for where its byte changes
(a vector compare of 128 bytes at a time) and writes each run as its first byte and matches of
the byte before (distance 1, up to 258 bytes), a run of 0 going on over the rows' ends and their
filter bytes. The same pass sums each row for the zlib stream's Adler-32. The tokens are written
with Huffman codes made for each block of them (deflate's dynamic blocks), so the 258-byte
matches that make up most of a mask cost a bit or two each.

The file is an 8-bit greyscale PNG without row filters, as libvips writes a mask: the same
pixels, read by any PNG reader. Masks the network makes, 12 MP: 1.2-3.1 against libvips'
7.3-10.5 ms, a third smaller (bench/README.md). Any uint8 image is written correctly; one whose
runs are short (a texture, noise: fewer than 8 bytes a token past the first 64 kB) is left to
zlib, whose search finds what runs do not.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from service.images.compiled import compiled

__all__ = ["encode", "warm"]

_BLOCK = 1 << 15  # tokens a block's Huffman codes are made for
_CHUNK = 128  # bytes compared at a time, in vector steps
_SUBCHUNK = 16  # then inside the stride that differs

# Length 3..258 → (symbol, extra bits, extra value); deflate's table (RFC 1951, 3.2.5).
_LEN_SYM = np.zeros(259, np.int64)
_LEN_NBITS = np.zeros(259, np.int64)
_LEN_EXTRA = np.zeros(259, np.int64)
_NBITS = (0,) * 8 + (1,) * 4 + (2,) * 4 + (3,) * 4 + (4,) * 4 + (5,) * 4  # symbols 257..284
_base = 3
for _sym, _nb in enumerate(_NBITS):
    for _len in range(_base, _base + (1 << _nb)):
        _LEN_SYM[_len], _LEN_NBITS[_len], _LEN_EXTRA[_len] = 257 + _sym, _nb, _len - _base
    _base += 1 << _nb
_LEN_SYM[258], _LEN_NBITS[258], _LEN_EXTRA[258] = 285, 0, 0  # 258 has a symbol of its own

# The order the code-length code's lengths are written in.
_CL_ORDER = np.array([16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15], np.int64)


@compiled()
def _put(out: np.ndarray, pos: int, buf: int, nb: int, value: int, n: int) -> tuple[int, int, int]:
    """Append the ``n`` ≤ 32 low bits of ``value`` (a whole code here is at most 21), least
    significant first, to the ``nb`` < 32 bits pending in ``buf``; whole 32-bit words go to
    ``out`` at ``pos``. (pos, buf, nb) after."""
    buf |= value << nb
    nb += n
    if nb >= 32:
        for k in range(4):
            out[pos + k] = (buf >> (8 * k)) & 0xFF
        pos += 4
        buf >>= 32
        nb -= 32
    return pos, buf, nb


@compiled()
def _lengths(freq: np.ndarray, limit: int) -> np.ndarray:
    """Huffman code lengths of at most ``limit`` bits for these frequencies; at least two
    symbols get a code, so the code is complete (one unused symbol takes the second place)."""
    n = freq.size
    f = freq.astype(np.int64)
    used = 0
    for i in range(n):
        if f[i] > 0:
            used += 1
    if used < 2:  # give the code a second symbol: a complete code of two one-bit codes
        for i in range(n):
            if f[i] == 0:
                f[i] = 1
                used += 1
                if used == 2:
                    break
    lengths = np.zeros(n, np.int64)
    weight = np.empty(2 * n, np.int64)
    parent = np.empty(2 * n, np.int64)
    alive = np.empty(2 * n, np.bool_)
    while True:
        m = 0
        leaf = np.empty(n, np.int64)
        for i in range(n):
            if f[i] > 0:
                leaf[m] = i
                weight[m] = f[i]
                alive[m] = True
                m += 1
        nodes = m
        for _ in range(m - 1):  # merge the two lightest live nodes (m ≤ 288: quadratic is fine)
            a = -1
            b = -1
            for k in range(nodes):
                if alive[k]:
                    if a < 0 or weight[k] < weight[a]:
                        b = a
                        a = k
                    elif b < 0 or weight[k] < weight[b]:
                        b = k
            alive[a] = False
            alive[b] = False
            weight[nodes] = weight[a] + weight[b]
            alive[nodes] = True
            parent[a] = nodes
            parent[b] = nodes
            nodes += 1
        parent[nodes - 1] = -1
        deepest = 0
        for k in range(m):
            d = 0
            j = k
            while parent[j] >= 0:
                j = parent[j]
                d += 1
            lengths[leaf[k]] = d
            deepest = max(deepest, d)
        if deepest <= limit:
            return lengths
        for i in range(n):  # flatten the frequencies and build again
            if f[i] > 0:
                f[i] = (f[i] + 1) // 2


@compiled()
def _codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes for these lengths, bit-reversed as deflate writes them."""
    count = np.zeros(16, np.int64)
    for ln in lengths:
        count[ln] += 1
    count[0] = 0
    nxt = np.zeros(16, np.int64)
    code = 0
    for bits in range(1, 16):
        code = (code + count[bits - 1]) << 1
        nxt[bits] = code
    codes = np.zeros(lengths.size, np.int64)
    for i in range(lengths.size):
        ln = lengths[i]
        if ln:
            c = nxt[ln]
            nxt[ln] += 1
            r = 0
            for _ in range(ln):
                r = (r << 1) | (c & 1)
                c >>= 1
            codes[i] = r
    return codes


# A block's steps, each run once a block of tokens: called, not inlined (inline="always" gave
# the same pace on 12 MP masks, and numba compiles inlined code again at every call site).


@compiled()
def _frequencies(tokens: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """How often each literal/length symbol and each distance symbol is used by ``count``
    tokens, each a byte (0..255) or 256 + the length of a match at distance 1; the end of the
    block once."""
    lfreq = np.zeros(286, np.int64)
    dfreq = np.zeros(30, np.int64)
    for t in range(count):
        v = tokens[t]
        if v < 256:
            lfreq[v] += 1
        else:
            lfreq[_LEN_SYM[v - 256]] += 1
            dfreq[0] += 1  # distance 1's symbol
    lfreq[256] = 1  # the end of the block
    return lfreq, dfreq


@compiled()
def _coded(lengths: np.ndarray, least: int) -> int:
    """How many of ``lengths`` a header lists: up to the last nonzero one, at least ``least``."""
    n = lengths.size
    while n > least and lengths[n - 1] == 0:
        n -= 1
    return n


@compiled()
def _length_runs(seq: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Code lengths run-length coded as a header writes them (16: repeat the last 3-6 times,
    17: 3-10 zeros, 18: 11-138 zeros): the symbols, their extra values, and how many."""
    rsym = np.empty(seq.size, np.int64)
    rext = np.empty(seq.size, np.int64)
    nr = 0
    i = 0
    while i < seq.size:
        v = seq[i]
        run = 1
        while i + run < seq.size and seq[i + run] == v:
            run += 1
        if v == 0 and run >= 3:
            take = min(run, 138)
            rsym[nr], rext[nr] = (17, take - 3) if take <= 10 else (18, take - 11)
            nr += 1
            i += take
            continue
        rsym[nr], rext[nr] = v, 0
        nr += 1
        i += 1
        run -= 1
        while run >= 3:
            take = min(run, 6)
            rsym[nr], rext[nr] = 16, take - 3
            nr += 1
            i += take
            run -= take
    return rsym, rext, nr


@compiled()
def _header(
    out: np.ndarray, st: np.ndarray, final: bool, llen: np.ndarray, dlen: np.ndarray
) -> None:
    """A dynamic block's header, for the literal/length code ``llen`` and the distance code
    ``dlen``: the block's type, then both codes' lengths, run-length coded in a code of their
    own."""
    nlit = _coded(llen, 257)  # the end of the block, 256, always has a code
    ndist = _coded(dlen, 1)
    rsym, rext, nr = _length_runs(np.concatenate((llen[:nlit], dlen[:ndist])))
    cfreq = np.zeros(19, np.int64)
    for k in range(nr):
        cfreq[rsym[k]] += 1
    clen = _lengths(cfreq, 7)
    ccode = _codes(clen)
    ncl = _coded(clen[_CL_ORDER], 4)
    pos, buf, nb = int(st[0]), int(st[1]), int(st[2])
    pos, buf, nb = _put(out, pos, buf, nb, 1 if final else 0, 1)
    pos, buf, nb = _put(out, pos, buf, nb, 2, 2)
    pos, buf, nb = _put(out, pos, buf, nb, nlit - 257, 5)
    pos, buf, nb = _put(out, pos, buf, nb, ndist - 1, 5)
    pos, buf, nb = _put(out, pos, buf, nb, ncl - 4, 4)
    for k in range(ncl):
        pos, buf, nb = _put(out, pos, buf, nb, clen[_CL_ORDER[k]], 3)
    for k in range(nr):
        s = rsym[k]
        pos, buf, nb = _put(out, pos, buf, nb, ccode[s], clen[s])
        if s == 16:
            pos, buf, nb = _put(out, pos, buf, nb, rext[k], 2)
        elif s == 17:
            pos, buf, nb = _put(out, pos, buf, nb, rext[k], 3)
        elif s == 18:
            pos, buf, nb = _put(out, pos, buf, nb, rext[k], 7)
    st[0], st[1], st[2] = pos, buf, nb


@compiled()
def _token_codes(
    llen: np.ndarray, lcode: np.ndarray, dlen: np.ndarray, dcode: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each token's whole code and its width in bits: a byte's, or a length's with its extra
    bits and distance 1's code (at most 15 + 5 + 1 bits: distance 1 is one of two one-bit
    codes)."""
    whole = np.zeros(515, np.int64)
    bits = np.zeros(515, np.int64)
    for v in range(256):
        whole[v], bits[v] = lcode[v], llen[v]
    for ln in range(3, 259):
        sym = _LEN_SYM[ln]
        if llen[sym]:
            n = llen[sym] + _LEN_NBITS[ln]
            whole[256 + ln] = lcode[sym] | (_LEN_EXTRA[ln] << llen[sym]) | (dcode[0] << n)
            bits[256 + ln] = n + dlen[0]
    return whole, bits


@compiled()
def _block(tokens: np.ndarray, count: int, final: bool, out: np.ndarray, st: np.ndarray) -> None:
    """One dynamic-Huffman block of ``count`` tokens, each a byte (0..255) or 256 + the length
    of a match of the byte before (distance 1): codes made for them, the header, the tokens,
    the end of the block."""
    lfreq, dfreq = _frequencies(tokens, count)
    llen = _lengths(lfreq, 15)
    dlen = _lengths(dfreq, 15)
    lcode = _codes(llen)
    dcode = _codes(dlen)
    _header(out, st, final, llen, dlen)
    whole, bits = _token_codes(llen, lcode, dlen, dcode)
    pos, buf, nb = int(st[0]), int(st[1]), int(st[2])
    for t in range(count):
        v = tokens[t]
        pos, buf, nb = _put(out, pos, buf, nb, whole[v], bits[v])
    pos, buf, nb = _put(out, pos, buf, nb, lcode[256], llen[256])
    st[0], st[1], st[2] = pos, buf, nb


# The scan indexes with unsigned integers: numba then leaves out the check for a negative index,
# and LLVM turns each fixed-length inner loop into vector compares (12 MP: 0.5 against 4.5 ms).


@compiled()
def _repeats(x: np.ndarray, i: int, v: int, n: int) -> int:
    """How many of ``x[i:i+n]`` equal ``v`` before the first that does not."""
    ui, un = np.uint64(i), np.uint64(n)
    uv = np.uint8(v)
    k = np.uint64(0)
    if n == 0 or x[ui] != uv:
        return 0
    # Short strides first (a texture's runs are short), then long ones, then short ones inside
    # the long one that differs; no early exit inside a stride, so each is vector compares. The
    # three loops are written out: one inlined helper for them measured 10% slower.
    for _ in range(4):
        if k + np.uint64(_SUBCHUNK) > un:
            break
        differ = False
        for t in range(_SUBCHUNK):
            differ |= x[ui + k + np.uint64(t)] != uv
        if differ:
            break
        k += np.uint64(_SUBCHUNK)
    else:
        while k + np.uint64(_CHUNK) <= un:
            differ = False
            for t in range(_CHUNK):
                differ |= x[ui + k + np.uint64(t)] != uv
            if differ:
                break
            k += np.uint64(_CHUNK)
        while k + np.uint64(_SUBCHUNK) <= un:
            differ = False
            for t in range(_SUBCHUNK):
                differ |= x[ui + k + np.uint64(t)] != uv
            if differ:
                break
            k += np.uint64(_SUBCHUNK)
    while k < un and x[ui + k] == uv:
        k += np.uint64(1)
    return int(np.int64(k))


@compiled()
def _run(tokens: np.ndarray, nt: int, v: int, n: int, fresh: bool) -> int:
    """Tokens for a run of ``n`` bytes of ``v``; ``fresh``: after a byte that is not ``v``, so
    the first is a literal. The rest repeat the byte before them: matches of 3 to 258 bytes
    (literals, under 3)."""
    if fresh:
        tokens[nt] = v
        nt += 1
        n -= 1
    if n >= 3:
        while n > 0:
            take = n if n <= 258 else (258 if n - 258 >= 3 else n - 3)
            tokens[nt] = 256 + take
            nt += 1
            n -= take
        return nt
    for _ in range(n):
        tokens[nt] = v
        nt += 1
    return nt


@compiled()
def _deflate(x: np.ndarray, h: int, w: int, out: np.ndarray) -> tuple[int, int]:
    """The rows of the h×w image ``x`` (flat, C order), each after a filter byte of 0, deflated
    into ``out`` as runs: (bytes written, Adler-32 of the filtered rows), or (-1, 0) as soon as
    the runs are short (under 8 bytes on average, past the first 64 kB: not a mask's)."""
    st = np.zeros(3, np.int64)  # the bit writer's position, pending bits and their count
    seg = w + 1  # a row in the stream: its filter byte, then its pixels
    # A block is written between rows once it has _BLOCK tokens; a row adds at most seg.
    tokens = np.empty(_BLOCK + 2 * seg + 64, np.int64)
    nt = 0
    written = 0  # tokens written in blocks so far
    mod = 65521
    a = 1
    b = 0
    # The run under way: its byte (-1: none yet), its length, and whether its first byte is
    # still to be written as a literal; written once it ends.
    rv = -1
    rn = 0
    fresh = True
    for r in range(h):
        row = r * w
        c = _repeats(x, row, 0, w)  # the filter byte's run of 0 goes on over the row's own
        if rv == 0:  # and the run before it may be of 0 too, across the row's end
            rn += 1 + c
            if rn > 3 * 258:  # a run over many rows: its head written, to bound the tokens held
                if fresh:
                    tokens[nt] = 0
                    nt += 1
                    rn, fresh = rn - 1, False
                while rn >= 2 * 258:  # in whole 258s: one symbol, a bit or two each
                    tokens[nt] = 256 + 258
                    nt += 1
                    rn -= 258
        else:
            if rn:
                nt = _run(tokens, nt, rv, rn, fresh)
            rv, rn, fresh = 0, 1 + c, True
        s = 0  # the row's sum, and the sum of each byte times its column
        t = 0
        while c < w:
            v = int(np.int64(x[row + c]))
            n = 1 + _repeats(x, row + c + 1, v, w - c - 1)
            s += v * n
            t += v * n * (2 * c + n - 1) // 2
            nt = _run(tokens, nt, rv, rn, fresh)
            rv, rn, fresh = v, n, True
            c += n
        # Adler-32 over the segment: a grows by its sum, b by each byte times how many bytes
        # from it to the segment's end, the filter byte's 0 first.
        b = (b + seg * a + w * s - t) % mod
        a = (a + s) % mod
        if nt >= _BLOCK:
            written += nt
            if 8 * written > (r + 1) * seg and (r + 1) * seg > 65536:
                return -1, 0
            _block(tokens, nt, False, out, st)
            nt = 0
    nt = _run(tokens, nt, rv, rn, fresh)
    if 8 * (written + nt) > h * seg and h * seg > 65536:
        return -1, 0
    _block(tokens, nt, True, out, st)
    pos, buf, nb = st[0], st[1], st[2]
    while nb > 0:  # the last bits, to a whole byte
        out[pos] = buf & 0xFF
        pos += 1
        buf >>= 8
        nb -= 8
    return pos, (b << 16) | a


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
    )


def encode(levels: np.ndarray) -> bytes | None:
    """An H×W uint8 image as an 8-bit greyscale PNG, or None where its runs are short (not a
    mask: a texture, noise), which zlib's own search compresses better."""
    x = np.ascontiguousarray(levels, dtype=np.uint8)
    h, w = x.shape
    if h == 0 or w == 0:
        return None  # no such PNG: the caller's encoder says why
    # Worst case: every byte a literal of 15 bits, and each block's header (the pages are
    # touched only as far as the stream goes).
    out = np.empty(2 * h * (w + 1) + 1024 * (h * (w + 1) // _BLOCK + 2), np.uint8)
    n, adler = _deflate(x.reshape(-1), h, w, out)
    if n < 0:
        return None
    idat = b"\x78\x01" + out[:n].tobytes() + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def warm() -> None:
    """Compile the coder (or load it from numba's cache) before the first mask asks for it."""
    disc = np.hypot(*np.mgrid[-40:40, -60:60]) < 30
    encode(np.where(disc, 255, 0).astype(np.uint8))
