"""crystallab dashboard entry point: navigation over the lab's pages and the shared sidebar, nothing else.

Start it with ``crystallab dashboard`` (binds 127.0.0.1:8501; see ``engine/dashboard.py``). Each page under
``pages/`` is a thin script: controls -> guard -> engine call -> chart.
"""

import streamlit as st

from pages.common import sidebar

st.set_page_config(page_title="crystallab", page_icon=":material/diamond:", layout="wide")

PAGES = [
    st.Page("pages/data.py", title="Data", icon=":material/dataset:", url_path="data", default=True),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:", url_path="train"),
    st.Page("pages/sample.py", title="Sample", icon=":material/science:", url_path="sample"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare:", url_path="compare"),
    st.Page("pages/structure.py", title="Structure", icon=":material/view_in_ar:", url_path="structure"),
]

page = st.navigation(PAGES)
sidebar()
page.run()
