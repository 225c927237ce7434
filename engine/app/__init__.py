"""What the dashboard needs from the engine: the `crystallab dashboard` launcher, run-folder readers for pages, the 3D viewer asset and HTML. No streamlit import here."""
