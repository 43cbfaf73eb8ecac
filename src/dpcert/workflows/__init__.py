"""Workflows: runs on disk, built from the learning and certification wings.

The run store and configuration (:mod:`.runconfig`); handing a run's instances to processes
or Ray tasks (:mod:`.dispatch`); ``dpcert run`` end to end (:mod:`.run`); the defences
compared (:mod:`.compare`); retraining attacks against the certificates (:mod:`.attack`);
reports and plots (:mod:`.report`).
"""
