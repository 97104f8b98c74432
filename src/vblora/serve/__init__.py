"""Many VB-LoRA adapters on one base model: the adapter store and mixed-adapter batches (docs/ARCHITECTURE.md).

```python
from vblora.serve import AdapterStore

store = AdapterStore(base_model, "adapters/")
with store.rows([store.acquire("a"), None, store.acquire("b")]):
    out = base_model(input_ids=ids)
```
"""

from vblora.serve.store import AdapterHandle, AdapterStore, UnknownAdapterError

__all__ = ["AdapterHandle", "AdapterStore", "UnknownAdapterError"]
