"""The app's router: `st.navigation` over one file per page in `views/`, each at its own URL path."""

from __future__ import annotations

import streamlit as st

from saelab.app.common import PAGES

st.set_page_config(page_title="saelab", page_icon=":material/neurology:", layout="wide")
st.navigation(list(PAGES.values())).run()
