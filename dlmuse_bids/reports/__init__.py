"""HTML reports: one per subject at the output root, one for the group (figures beside them).

Reports read only the derivative dataset (label maps, QC and volume tables, sidecars), so they can
be rebuilt from the outputs of any run; they load nothing from the internet.
"""
