"""DeepSpeed's first import, done one way wherever mmpt needs it (the MoE layer, the engine, doctor).

`import deepspeed` imports DeepSpeed's autotuner, which imports MLflow whenever it is installed
(`mmpt[tracking]` installs it), only to log DeepSpeed's own autotuning experiments, which mmpt never
runs. MLflow drags in its own dependency tree: `import deepspeed` after torch took 1.50 CPU-s here,
0.38 without it (`python -m benchmarks.imports`). `import_deepspeed` hides MLflow during that one import
(DeepSpeed's autotuner then records that it has none) and puts everything back afterwards, so
`import mlflow` works as before for whoever wants it; when MLflow is already imported, nothing is
hidden (it costs nothing then).
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType

_HIDDEN = ("mlflow",)  # imported by deepspeed.autotuning.autotuner, used only by it
_LOCK = threading.Lock()


def import_deepspeed() -> ModuleType:
    """`deepspeed`, importing it first if needed without the modules in `_HIDDEN`."""
    loaded = sys.modules.get("deepspeed")
    if loaded is not None:
        return loaded
    with _LOCK:
        hidden = [name for name in _HIDDEN if name not in sys.modules]
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
        try:
            import deepspeed
        finally:
            for name in hidden:
                if sys.modules.get(name, ...) is None:  # ours: a real import in between replaced it
                    del sys.modules[name]
    return deepspeed
