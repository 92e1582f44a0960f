"""`index.sync_state()`: what readiness, `kzt_*_metadata_synced` and the alerts say about metadata.

Required sources (pods, nodes) must have listed once and not be refused (401/403) now; a refusal after the
first sync makes the component unready while the last answers keep naming; a transient error keeps it
ready and is still reported; the Service catalog has its own switch, and an answered request ends a
refusal without waiting for the next full listing.
"""

from __future__ import annotations

from otel_kzt.k8s.index import ClusterIndex
from otel_kzt.k8s.model import sync_summary


def test_sync_state_of_required_sources() -> None:
    index = ClusterIndex()
    index.register_source("api-nodes", ("nodes",))
    index.register_source("api-pods", ("pods",))
    state = index.sync_state()
    assert not state.synced and state.pending == ("nodes", "pods")
    assert state.describe() == "metadata not synced: nodes: not listed yet; pods: not listed yet"
    index.mark_synced("api-nodes")
    failure = index.source_failed("api-pods", "list", 403, "Forbidden", 'pods is forbidden: User "x"')
    assert failure.denied and failure.attempts == 1 and failure.required
    again = index.source_failed("api-pods", "list", 403, "Forbidden", 'pods is forbidden: User "x"')
    assert again.attempts == 2 and again.since_unix_s == failure.since_unix_s
    assert sync_summary(index) == (
        False, 'metadata not synced: list pods: HTTP 403 Forbidden: pods is forbidden: User "x"'
    )
    index.mark_synced("api-pods")
    assert sync_summary(index) == (True, "metadata synced") and index.ready()
    # Refused after the first sync (RBAC changed): not synced, while lookups keep the last answers.
    index.source_failed("api-nodes", "watch", 403, "Forbidden", "nodes is forbidden")
    assert not index.sync_state().synced and index.ready()
    index.source_answered("api-nodes")
    assert index.sync_state().synced and index.sync_state().failures == ()
    # A transient error (the API server restarting) keeps the component ready, and says so.
    index.source_failed("api-pods", "watch", 503, "ServiceUnavailable", "try again")
    state = index.sync_state()
    assert state.synced
    assert state.describe() == "metadata synced: watch pods: HTTP 503 ServiceUnavailable: try again"
    assert not state.services  # no source of Services here


def test_no_required_source_is_not_synced() -> None:
    assert not ClusterIndex().sync_state().synced
    assert sync_summary(None)[0] is False


def test_services_have_their_own_switch_and_an_answer_ends_a_refusal() -> None:
    index = ClusterIndex()
    index.register_source("core")
    index.mark_synced("core")
    catalog = index.services
    catalog.register_source("api-services")
    catalog.mark_synced("api-services")
    assert index.sync_state().services
    catalog.note_failure("api-services", "watch services: HTTP 403 Forbidden", refused=True)
    state = index.sync_state()
    assert state.synced and not state.services  # ready on pods and nodes; savings off
    catalog.source_answered("api-services")  # its watch answered again once RBAC allowed it
    assert index.sync_state().services and catalog.reason() == ""
