"""crystallab dashboard entry point: navigation over the lab's pages and the shared sidebar, nothing else.

Start it with ``crystallab dashboard`` (binds 127.0.0.1:8501; see ``engine/app/dashboard.py``). Each page under
``pages/`` is a thin script: controls -> guard -> engine call -> chart.
"""

import streamlit as st

from pages.common import sidebar

# No page or page_icon icons: Streamlit turns them into favicons fetched from fonts.gstatic.com, which lab
# networks block (the e2e test fails on any non-local request).
st.set_page_config(page_title="crystallab", layout="wide")

# Home is served at "/": the default page's own url_path is ignored by Streamlit, so a Data page that was the
# default answered its advertised /data address with "Page not found".
PAGES = [
    st.Page("pages/home.py", title="Home", url_path="home", default=True),
    st.Page("pages/data.py", title="Data", url_path="data"),
    st.Page("pages/train.py", title="Train", url_path="train"),
    st.Page("pages/sample.py", title="Sample", url_path="sample"),
    st.Page("pages/compare.py", title="Compare", url_path="compare"),
    st.Page("pages/csp.py", title="Structure prediction", url_path="csp"),
    st.Page("pages/structure.py", title="Structure", url_path="structure"),
    st.Page("pages/infill.py", title="Infill", url_path="infill"),
]

page = st.navigation(PAGES)
sidebar()
page.run()
