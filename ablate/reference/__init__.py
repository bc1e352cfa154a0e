"""Reference data carried from the literature: the paper's Table 1 (paper_table1.csv)."""
