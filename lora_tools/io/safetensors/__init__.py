"""The safetensors container: a header parser that trusts nothing, lazy reads, a streaming writer.

Layout (see docs/formats.md and shared/FORMATS.md section 1): 8-byte little-endian header length
N, N bytes of UTF-8 JSON, then the data buffer. The JSON maps tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` plus an optional ``__metadata__`` object of
strings. Every number in the header is checked before it is used to allocate or seek.

One module per concern, each importing only those before it:

- :mod:`.dtypes`: the dtype table, numpy equivalents (ml_dtypes imported lazily), F4 packing;
- :mod:`.tensors`: :class:`TensorInfo` (where a tensor lies), :class:`Tensor`,
  :class:`ArrayTensor`;
- :mod:`.header`: :func:`check_header`, every rule of the reference reader on the JSON header;
- :mod:`.reader`: :func:`read_header` and :class:`SafetensorsFile` (lazy, positioned reads);
- :mod:`.spool`: :class:`Spool` (tensors kept in an anonymous temporary file until written);
- :mod:`.writer`: :class:`SafetensorsWriter` (streamed, atomic) and :func:`save_tensors`.

Import from here: ``from lora_tools.io.safetensors import SafetensorsFile``.

Example:
    >>> import numpy as np
    >>> from lora_tools.io.safetensors import SafetensorsFile, save_tensors
    >>> save_tensors("/tmp/doc-example.safetensors", {"w": np.eye(2, dtype=np.float32)})
    >>> with SafetensorsFile("/tmp/doc-example.safetensors") as f:
    ...     f.read("w").tolist()
    [[1.0, 0.0], [0.0, 1.0]]
"""

from lora_tools.io.safetensors.dtypes import (
    DTYPES,
    DType,
    dtype_of,
    numpy_dtype,
    pack_f4,
    scalar_value,
    tensor_nbytes,
    unpack_f4,
)
from lora_tools.io.safetensors.header import METADATA_KEY, Header, Problem, check_header, gc_paused
from lora_tools.io.safetensors.reader import (
    MAX_HEADER_BYTES,
    PICKLE_SUFFIXES,
    FileTensor,
    SafetensorsFile,
    file_kind,
    read_header,
    read_header_bytes,
)
from lora_tools.io.safetensors.spool import Spool, SpooledTensor
from lora_tools.io.safetensors.tensors import ArrayTensor, Tensor, TensorInfo, as_tensor
from lora_tools.io.safetensors.writer import (
    SafetensorsWriter,
    TensorSpec,
    encode_header,
    reference_order,
    save_tensors,
)

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "METADATA_KEY",
    "PICKLE_SUFFIXES",
    "ArrayTensor",
    "DType",
    "FileTensor",
    "Header",
    "Problem",
    "SafetensorsFile",
    "SafetensorsWriter",
    "Spool",
    "SpooledTensor",
    "Tensor",
    "TensorInfo",
    "TensorSpec",
    "as_tensor",
    "check_header",
    "dtype_of",
    "encode_header",
    "file_kind",
    "gc_paused",
    "numpy_dtype",
    "pack_f4",
    "read_header",
    "read_header_bytes",
    "reference_order",
    "save_tensors",
    "scalar_value",
    "tensor_nbytes",
    "unpack_f4",
]
