"""Entry points MLflow loads while it is itself being imported: they must not import MLflow
at module level (that would be circular), so they only defer to trackd.mlflow_store."""


def tracking_store(store_uri=None, artifact_uri=None):
    """Builds the ``trackd:`` tracking store (writes through the agent)."""
    from .mlflow_store import TrackdStore

    return TrackdStore(store_uri, artifact_uri)


def registry_store(store_uri=None):
    """The model registry under ``trackd:``: MLflow's own registry store on the database the
    agent writes, since registry calls are rare and not on the training path."""
    from .mlflow_store import registry_store as build

    return build(store_uri)
