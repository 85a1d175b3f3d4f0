"""The merge engine: plan a merge from a config, stream tensors through a method, write the result.

Import from the modules (``mergelab.merge.engine.run_merge``, ``mergelab.merge.state_dicts.merge_state_dicts``,
``mergelab.merge.config.MergeConfig``); this package file imports nothing, so importing one module never
loads the others.
"""
