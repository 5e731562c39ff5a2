"""Marks a caller puts in a model-host call's gRPC metadata: one definition for the router that
sets them and the model host's admission (services/model_host/admission.py) that reads them."""

# Calls of `priority: critical` routes: the host keeps a share of each model's queue for them.
PRIORITY_METADATA_KEY = "x-mirador-priority"
CRITICAL = "critical"
# A call that joins one not yet answering in its share of the time (a hedge): refused by a host whose
# cores are saturated, since it would run beside the late call.
HEDGE_METADATA_KEY = "x-mirador-hedge"
HEDGE = "late"
