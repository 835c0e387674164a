# Sphinx configuration of the site of executed notebooks (`make html`, built by flipfrag/site.py from a staging
# copy of this folder). myst-nb renders the notebooks exactly as `make figures` executed them: nothing is re-run.
project = "flipfrag"
author = "flipfrag authors"
copyright = "flipfrag authors (MIT)"
html_title = "flipfrag — executed notebooks"

extensions = ["myst_nb"]
nb_execution_mode = "off"  # never execute: the pages show the outputs of `make figures`
nb_output_stderr = "show"
nb_merge_streams = True
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

root_doc = "index"
exclude_patterns = [".doctrees", "_build", "**/.ipynb_checkpoints", "_extra"]
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header"]

html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_extra_path = ["_extra"]
html_css_files = ["flipfrag.css"]
html_copy_source = False
html_show_sourcelink = False
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "home_page_in_toc": True,
    "secondary_sidebar_items": {"**": ["page-toc"], "index": []},  # the wide claims table gets the room
}
