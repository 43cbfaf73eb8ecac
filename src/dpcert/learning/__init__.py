"""Learning: the models and the DP-SGD training that produce a certified ensemble's instances.

Torch lives here. Datasets (:mod:`.data`) and fixed features (:mod:`.features`); model
families (:mod:`.models`); per-example clipping without per-example gradients
(:mod:`.ghost`); counter-based random streams (:mod:`.philox`); the batched engine that trains
K instances of a torch model as one computation (:mod:`.stacked`) and its counterpart for
softmax regression on fixed features (:mod:`.linear`); and the per-instance reference path
the engines are tested against, also used for the baselines' non-private training
(:mod:`.reference`).
"""
