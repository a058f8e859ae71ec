"""One array per record on the wire: a message's named arrays travel as one blob.

Flower moves every ``Array`` of a message as objects of their own (the array and its
chunks), and each object is a separate request on every hop of a deployment: ServerApp
-> SuperLink -> SuperNode -> ClientApp and back. The adapters and statistics of a
LoRA model are many small tensors (about 140 per message for the default model), so
a deployed round paid more for the requests than for the bytes. Here each
``ArrayRecord`` with two or more arrays becomes one ``Array`` (``PACKED``, the arrays'
serialised bytes end to end) plus a ``ConfigRecord`` ``f"{name}{PACKED_LAYOUT}"`` that
says how to cut it: keys, dtypes, shapes, stypes and byte lengths. Unpacking gives
back the same ``Array`` objects, bit for bit, under the same names, so everything
above the wire (specs, checks, merges, the byte counts in the results) sees the
message as it was built.

Both ends pack what they send and unpack what they receive:
:func:`lorm_flwr.server.exchange.exchange` on the server and the handlers of
:mod:`lorm_flwr.client.handlers` on the client, in simulation and deployment alike.
Flower records only: no torch.
"""

from __future__ import annotations

import io
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from lorm_flwr.wire.keys import PACKED, PACKED_LAYOUT

# The layout's fields: one entry per array, in packing order (``dims`` holds every
# array's shape end to end, ``ndims`` how many of them each array takes).
_LIST_FIELDS = ("keys", "dtypes", "stypes", "ndims", "dims", "nbytes")
_NUMPY = "numpy.ndarray"  # Flower's stype of a NumPy array


class PackingError(ValueError):
    """A packed record that cannot be unpacked (its reason is in the text)."""


def pack_content(content: RecordDict) -> RecordDict:
    """The same content with every ``ArrayRecord`` of two or more arrays packed.

    Records with fewer arrays, and every other record, are kept as they are (the same
    objects). Raises :class:`PackingError` when a record's name is taken by the layout
    record another one needs (names ending in ``PACKED_LAYOUT`` are reserved)."""
    out = RecordDict()
    for name, record in content.items():
        if name.endswith(PACKED_LAYOUT):
            raise PackingError(f"record name {name!r} ends in the reserved {PACKED_LAYOUT!r}")
        if isinstance(record, ArrayRecord) and len(record) >= 2:
            blob, layout = _pack(record)
            out[name] = ArrayRecord({PACKED: blob})
            out[name + PACKED_LAYOUT] = layout
        else:
            out[name] = record
    return out


def _pack(record: ArrayRecord) -> tuple[Array, ConfigRecord]:
    fields: dict[str, list] = {f: [] for f in _LIST_FIELDS}
    parts = []
    for key, array in record.items():
        fields["keys"].append(key)
        fields["dtypes"].append(array.dtype)
        fields["stypes"].append(array.stype)
        fields["ndims"].append(len(array.shape))
        fields["dims"].extend(int(d) for d in array.shape)
        fields["nbytes"].append(len(array.data))
        parts.append(array.data)
    if not fields["dims"]:  # a ConfigRecord list may not be empty: all arrays are scalars
        fields["dims"] = [-1]
    # A 1-D uint8 NumPy array, written as np.save would, with one copy of the bytes.
    total = sum(fields["nbytes"])
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (total,)})  # fmt: skip
    data = b"".join([header.getvalue(), *parts])
    return Array(dtype="uint8", shape=(total,), stype=_NUMPY, data=data), ConfigRecord(fields)


def unpack_content(content: RecordDict) -> RecordDict:
    """Undo :func:`pack_content`: each packed record back to its named arrays.

    Raises :class:`PackingError` naming the record for a layout without its record, a
    layout of a layout (``arrays.layout.layout``: every record of a reply is either
    unpacked or kept, none is dropped unseen), a record whose layout is malformed, or a
    blob whose length is not the layout's."""
    out = RecordDict()
    layouts = {n[: -len(PACKED_LAYOUT)] for n in content if n.endswith(PACKED_LAYOUT)}
    for base in sorted(layouts):
        if base.endswith(PACKED_LAYOUT):
            raise PackingError(f"layout {base + PACKED_LAYOUT!r} describes another layout")
        if base not in content:
            raise PackingError(f"layout {base + PACKED_LAYOUT!r} has no record {base!r}")
    for name, record in content.items():
        if name.endswith(PACKED_LAYOUT):
            continue
        if name in layouts:
            out[name] = _unpack(name, record, content[name + PACKED_LAYOUT])
        else:
            out[name] = record
    return out


def _unpack(name: str, record: object, layout: object) -> ArrayRecord:
    if not isinstance(record, ArrayRecord) or set(record.keys()) != {PACKED}:
        raise PackingError(f"packed record {name!r} must be an ArrayRecord of one {PACKED!r}")
    if not isinstance(layout, ConfigRecord) or set(layout.keys()) != set(_LIST_FIELDS):
        raise PackingError(f"layout of {name!r} must be a ConfigRecord of {_LIST_FIELDS}")
    keys, dtypes, stypes, ndims, dims, nbytes = (layout[f] for f in _LIST_FIELDS)
    n = len(keys) if isinstance(keys, list) else -1
    if (
        n < 2
        or not all(isinstance(v, list) and len(v) == n for v in (dtypes, stypes, ndims, nbytes))
        or not isinstance(dims, list)
        or not all(isinstance(k, str) for k in (*keys, *dtypes, *stypes))
        or not all(type(v) is int and v >= 0 for v in (*ndims, *nbytes))
        or not all(type(d) is int for d in dims)
        or len(set(keys)) != n
    ):
        raise PackingError(f"layout of {name!r} is malformed")
    if sum(ndims) == 0:
        if dims != [-1]:
            raise PackingError(f"layout of {name!r} is malformed (dims)")
        dims = []
    if sum(ndims) != len(dims) or any(d < 0 for d in dims):
        raise PackingError(f"layout of {name!r}: dims do not match ndims")
    dim = 0
    for key, nd, size in zip(keys, ndims, nbytes, strict=True):
        if math.prod(dims[dim : dim + nd]) > size:  # every element takes at least a byte
            raise PackingError(f"layout of {name!r}: {key!r} has more elements than bytes")
        dim += nd
    data, start = _blob(name, record[PACKED])
    if len(data) - start != sum(nbytes):
        raise PackingError(
            f"packed record {name!r} holds {len(data) - start} bytes; its layout says {sum(nbytes)}"
        )
    view = memoryview(data)  # each array's bytes are copied once, out of the blob
    arrays = {}
    offset, dim = start, 0
    for key, dtype, stype, nd, size in zip(keys, dtypes, stypes, ndims, nbytes, strict=True):
        shape = tuple(dims[dim : dim + nd])
        arrays[key] = Array(dtype=dtype, shape=shape, stype=stype,
                            data=bytes(view[offset : offset + size]))  # fmt: skip
        offset += size
        dim += nd
    return ArrayRecord(arrays)


def _blob(name: str, packed: Array) -> tuple[bytes, int]:
    """The packed array's serialised bytes and where its contents start, checked to be a
    1-D uint8 NumPy array (read from its header, without a copy of the contents)."""
    if packed.stype != _NUMPY or packed.dtype != "uint8" or len(packed.shape) != 1:
        raise PackingError(
            f"packed record {name!r} must hold a 1-D uint8 NumPy array, not "
            f"{packed.dtype} {tuple(packed.shape)} ({packed.stype})"
        )
    data = packed.data
    try:
        shape, fortran, dtype, start = npy_header(data)
    except ValueError as exc:
        raise PackingError(f"packed record {name!r} cannot be read: {exc}") from None
    size = len(data) - start
    if dtype != np.uint8 or fortran or shape != (size,) or tuple(packed.shape) != (size,):
        raise PackingError(f"packed record {name!r}: its header does not match its bytes")
    return data, start


def npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, start of the contents)`` from the header of an
    ``np.save`` serialisation, without reading (or allocating) its contents. Raises
    ``ValueError`` for anything that is not such a header; pickled object arrays are
    refused (``np.load`` would need ``allow_pickle``)."""
    stream = io.BytesIO(data)  # no copy: BytesIO shares the bytes until written to
    try:
        version = np.lib.format.read_magic(stream)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}[version]  # fmt: skip
        shape, fortran, dtype = read(stream)
    except Exception as exc:  # noqa: BLE001 - any unreadable header is one error
        raise ValueError(f"not a NumPy array header ({exc!r})") from None
    if dtype.hasobject:
        raise ValueError(f"an object array ({dtype}) is never loaded")
    return tuple(int(d) for d in shape), bool(fortran), dtype, stream.tell()
