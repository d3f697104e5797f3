"""Reports from stored records: leaderboard (Markdown, CSV, LaTeX, HTML) and Pareto plots.

``write_report(stores, out)`` reads the latest state of every cell from one or more results
folders and writes ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard.tex``, the plots
and, with ``html=True``, the self-contained ``report.html``. The modules:

- ``records``: which records (latest state per cell, several folders deduplicated, unreadable
  files listed);
- ``labels``: method labels, families, protocols and regimes in words;
- ``table``: the leaderboard rows, deltas and paired noise;
- ``write``: ``write_report``, every output at once;
- ``plots``, ``formats``, ``html``: the outputs; ``escape``: escaping for each format;
  ``formatting``: numbers;
- ``compare``: two result sets side by side, like with like.
"""
