"""Choose the implementation of the memory hot paths: native, or pure Python.

The checkpoint copy loop, the page codec and the checksums must run at memory
speed, which only the C extension ``tremus._native`` does. The pure-Python
``tremus._pyfallback`` computes byte-identical results, so tremus still works
(slowly) where the extension was not built, and the tests can check one against
the other.

Use ``impl`` for the memory functions (``gather``, ``scatter``, ``hash64``,
``delta_encode``, ``delta_decode``, ``dirty_bitmap_to_pfns``, ``memcpy``): code
that calls through it works with either implementation. Use ``native`` for the
KVM functions (``kvm_run``, ``kick``, ...), which have no fallback; it is ``None``
when the extension is missing, and then the micro-VM cannot run.

Set ``TREMUS_PURE_PYTHON=1`` in the environment to force the fallback (for
example to test a code path against it); it is read once, at import.
"""

from __future__ import annotations

import os
from types import ModuleType

from tremus import _pyfallback as fallback

__all__ = ["impl", "native", "fallback", "using_native", "native_import_error"]

native: ModuleType | None
"""The C extension, or ``None`` if it is not built or cannot be loaded."""

native_import_error: ImportError | None
"""Why the extension could not be imported, kept so error messages can say why."""

try:
    from tremus import _native as _native_module
except ImportError as exc:  # not built, or built for another interpreter
    native = None
    native_import_error = exc
else:
    native = _native_module
    native_import_error = None

using_native: bool = native is not None and os.environ.get("TREMUS_PURE_PYTHON", "") != "1"
"""Whether ``impl`` is the extension (False: the pure-Python fallback)."""

impl: ModuleType = native if (using_native and native is not None) else fallback
"""The implementation of the memory functions in use."""
