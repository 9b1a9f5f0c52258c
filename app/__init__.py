"""The Streamlit app that browses a feature store, installed as `saelab.app`.

`saelab app --store PATH` serves `main.py` (a router over one file per page in `views/`). The
pages hold no SQL and no torch: they call `saelab.store.FeatureStore` methods, the helpers in
`common` (the store, the chosen SAE, URL parameters, messages) and the HTML / figure builders in
`render`, which tests call directly. Importing this package imports neither streamlit nor torch.
"""

from __future__ import annotations

from pathlib import Path

MAIN = Path(__file__).with_name("main.py")
"""The script `streamlit run` serves."""

STORE_ENV = "SAELAB_STORE"
"""Environment variable naming the feature store the app reads (`saelab app --store` sets it)."""

DEFAULT_STORE = "runs/features.duckdb"
