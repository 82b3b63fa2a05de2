"""The reference experiments: does intra-class patch swap help, and where?

Not part of the library's API. A training loop (:mod:`.train`, the
``ipsd-train`` console script) that compares plain cross-entropy, CS-KD and
IPS from the same initial weights; the regime study over training-set sizes
(:mod:`.regimes`); their data sets, models, metrics and figures. The code
here uses the library only through ``ipsd_cuda``'s public names, and the
library never imports it.
"""
