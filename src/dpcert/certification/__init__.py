"""Certification: everything that turns a trained ensemble's outputs into certificates.

Pure numpy/scipy, no torch. Layers, bottom up: the mechanism record a training run writes
(:mod:`.mechanism`); its group-r privacy in RDP (:mod:`.rdp`) and as a privacy loss
distribution (:mod:`.pld`); outcome bounds derived from either (:mod:`.outcomes`) and cached
per mechanism (:mod:`.accounting`); confidence bounds on the clean label probabilities
(:mod:`.bounds`); the radius search and certificates (:mod:`.certify`); and the partition and
bagging defences' certificates (:mod:`.baselines`).
"""
