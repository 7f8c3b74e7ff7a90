"""rotelab.store — the run's zarr v3 store: activations, metrics, derived arrays, commit markers.

>>> from rotelab.store import Store
>>> st = Store.open("runs/x/store.zarr", fingerprint={"model": "...", "tokenizer": "...", "dataset": "..."})
>>> kg = st.ensure_kind("key", checkpoints=ids, layers=range(31), items=items_df, hidden=576)
>>> kg.write_slab("ep3", 5, acts)           # [item, hidden]; chunk first, then its commit marker
>>> kg.read_activations(layers=[5])         # float32 [checkpoint, layer, item, hidden], NaN = uncommitted

Imports only numpy, pandas, zarr (xarray lazily, in ``KindGroup.to_xarray``) and ``rotelab.errors``.
"""

from .errors import MissingDataError, StoreError, StoreMismatchError
from .kind_group import KindGroup
from .layout import ITEM_COLUMNS
from .zarr_store import Store

__all__ = ["ITEM_COLUMNS", "KindGroup", "MissingDataError", "Store", "StoreError", "StoreMismatchError"]
