"""The simulated cluster as plain values: address plan, nodes, pods. No side effects here.

Every other demo module reads these values: `topology` builds namespaces from them, `metadata` writes the
Kubernetes `List` for them, `workloads` places the story's pods on them, and the end-to-end tests compute
ground truth over them. Addresses are private (RFC 1918 IPv4, ULA IPv6) and live only inside namespaces the
demo creates, except the one fabric address of the host (where the enricher listens).

Address plan for network id S (one per user of the topology, so the demo and the tests never collide):

    fabric (node network)  10.S.0.0/24        fd7a:0:S::/64       host .1 / ::1, node i .(11+i) / ::(11+i)
    pods of node i         10.S.(10+i).0/24   fd7a:1:S:(10+i)::/64
    the "internet" host    192.168.S.10       fd7a:2:S::10        behind 10.S.0.250 / fd7a:0:S::250
    Service cluster IPs    10.S.200.(10+k)    fd7a:0:S:200::(10+k)  (no device holds them: kube-proxy DNAT)
"""

from __future__ import annotations

import hashlib
import ipaddress
import uuid
from dataclasses import dataclass, field

from otel_kzt.schema import WorkloadKind

IFACE_FABRIC = "eth0"  # a node's interface on the fabric, and a pod's interface towards its node
POD_GATEWAY_V4 = "169.254.1.1"  # link-local next hop every pod uses (Calico's trick: no per-pod subnet)
POD_GATEWAY_V6 = "fe80::1"
MAX_NODES = 100


@dataclass(frozen=True, slots=True)
class AddressPlan:
    net_id: int  # S above: 1..250

    def __post_init__(self) -> None:
        if not 1 <= self.net_id <= 250:
            raise ValueError(f"net_id must be within 1..250, got {self.net_id}")

    @property
    def fabric_v4(self) -> str:
        return f"10.{self.net_id}.0.0/24"

    @property
    def fabric_v6(self) -> str:
        return f"fd7a:0:{self.net_id}::/64"

    def cluster_nets(self, family: int) -> tuple[str, ...]:
        """Fabric and pod networks: what leaves them for anywhere else is masqueraded by the node."""
        if family == 4:
            return (f"10.{self.net_id}.0.0/16",)
        return (f"fd7a:0:{self.net_id}::/48", f"fd7a:1:{self.net_id}::/48")

    def host(self, family: int) -> str:
        return f"10.{self.net_id}.0.1" if family == 4 else f"fd7a:0:{self.net_id}::1"

    def node(self, index: int, family: int) -> str:
        return f"10.{self.net_id}.0.{11 + index}" if family == 4 else f"fd7a:0:{self.net_id}::{11 + index}"

    def pod_cidr(self, node_index: int, family: int) -> str:
        if family == 4:
            return f"10.{self.net_id}.{10 + node_index}.0/24"
        return f"fd7a:1:{self.net_id}:{10 + node_index}::/64"

    def pod(self, node_index: int, slot: int, family: int) -> str:
        net = ipaddress.ip_network(self.pod_cidr(node_index, family))
        return str(net[2 + slot])

    def service_cidr(self, family: int) -> str:
        return f"10.{self.net_id}.200.0/24" if family == 4 else f"fd7a:0:{self.net_id}:200::/64"

    def service_ip(self, index: int, family: int) -> str:
        """The cluster IP number `index` (0..239) of a Service."""
        if not 0 <= index < 240:
            raise ValueError(f"service index must be within 0..239, got {index}")
        if family == 4:
            return f"10.{self.net_id}.200.{10 + index}"
        return f"fd7a:0:{self.net_id}:200::{10 + index}"

    def internet_gateway(self, family: int) -> str:
        return f"10.{self.net_id}.0.250" if family == 4 else f"fd7a:0:{self.net_id}::250"

    def internet(self, family: int) -> str:
        return f"192.168.{self.net_id}.10" if family == 4 else f"fd7a:2:{self.net_id}::10"


@dataclass(frozen=True, slots=True)
class NodeSpec:
    index: int
    name: str  # the Kubernetes node name (also the agent's --node-name and its pin directory)
    netns: str
    zone: str
    zone_index: int
    region: str
    provider_id: str  # spec.providerID: gce://project/zone/name or aws:///zone/instance
    instance_type: str
    v4: str
    v6: str

    @property
    def addresses(self) -> tuple[str, str]:
        return (self.v4, self.v6)


@dataclass(frozen=True, slots=True)
class PodSpec:
    name: str
    namespace: str
    workload_kind: WorkloadKind  # the top owner (Deployment, StatefulSet, DaemonSet ...)
    workload_name: str
    app: str  # the `app.kubernetes.io/name` label
    node: NodeSpec
    netns: str  # the pod's own netns, or the node's for host-network pods
    v4: str
    v6: str
    host_network: bool = False
    ports: tuple[int, ...] = ()
    template_hash: str | None = None  # Deployments: the ReplicaSet's pod-template-hash

    @property
    def addresses(self) -> tuple[str, str]:
        return (self.v4, self.v6)

    @property
    def uid(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"otel-kzt-demo/pod/{self.namespace}/{self.name}"))


@dataclass(slots=True)
class Cluster:
    """Nodes and pods of one simulated cluster; pods are added by the workloads story."""

    prefix: str  # namespace-name prefix, unique per user (demo: "kzd", tests: "kz")
    plan: AddressPlan
    region: str
    nodes: list[NodeSpec]
    pods: list[PodSpec] = field(default_factory=list)
    _slots: dict[int, int] = field(default_factory=dict)

    @property
    def fabric_netns(self) -> str:
        return f"{self.prefix}-fab"

    @property
    def internet_netns(self) -> str:
        return f"{self.prefix}-inet"

    @property
    def host_link(self) -> str:
        """The host's veth into the fabric (in the root namespace)."""
        return f"{self.prefix}-host"

    def zones(self) -> list[str]:
        return sorted({n.zone for n in self.nodes})

    def node_at(self, zone_index: int, index_in_zone: int) -> NodeSpec:
        """The node `index_in_zone` of zone `zone_index`, both taken modulo what exists."""
        zones = self.zones()
        zone = zones[zone_index % len(zones)]
        in_zone = [n for n in self.nodes if n.zone == zone]
        return in_zone[index_in_zone % len(in_zone)]

    def add_pod(self, name: str, namespace: str, kind: WorkloadKind, workload: str, node: NodeSpec, *,
                app: str | None = None, ports: tuple[int, ...] = (), host_network: bool = False,
                template_hash: str | None = None) -> PodSpec:
        if host_network:
            v4, v6, netns = node.v4, node.v6, node.netns
        else:
            slot = self._slots.get(node.index, 0)
            self._slots[node.index] = slot + 1
            v4, v6 = self.plan.pod(node.index, slot, 4), self.plan.pod(node.index, slot, 6)
            netns = f"{self.prefix}-p{len(self.pods)}"
        pod = PodSpec(name=name, namespace=namespace, workload_kind=kind, workload_name=workload,
                      app=app or workload, node=node, netns=netns, v4=v4, v6=v6,
                      host_network=host_network, ports=ports, template_hash=template_hash)
        self.pods.append(pod)
        return pod

    def routed_pods(self) -> list[PodSpec]:
        """Pods with a namespace of their own (not host network)."""
        return [p for p in self.pods if not p.host_network]

    def pods_on(self, node: NodeSpec) -> list[PodSpec]:
        return [p for p in self.pods if p.node.name == node.name]

    def owner_of(self, address: str) -> PodSpec | NodeSpec | None:
        """The pod (preferred) or node owning an address, as the enricher should name it."""
        for pod in self.pods:
            if address in pod.addresses and not pod.host_network:
                return pod
        for node in self.nodes:
            if address in node.addresses:
                return node
        return None


STYLES = ("gke", "eks")


def _node_identity(style: str, zone: str, v4: str, *, pool: str, index: int) -> tuple[str, str, str]:
    """(name, providerID, instance type) as the cloud names its nodes."""
    if style == "eks":
        # EKS's default names contain dots (a DNS name): what real clusters throw at the agent's pins.
        name = f"ip-{v4.replace('.', '-')}.{zone[:-1]}.compute.internal"
        return name, f"aws:///{zone}/i-0{pool}{index:08x}", "m6i.large"
    name = f"gke-demo-pool-{zone[-1]}-{pool}-{index:04d}"
    return name, f"gce://otel-kzt-demo/{zone}/{name}", "e2-standard-4"


def make_cluster(prefix: str, net_id: int, zones: int, nodes_per_zone: int, style: str = "gke") -> Cluster:
    """`zones` x `nodes_per_zone` nodes, named as GKE (europe-west1-a ...) or EKS (eu-west-1a ...) would."""
    if not 1 <= zones <= 26:
        raise ValueError(f"zones must be within 1..26, got {zones}")
    if nodes_per_zone < 1 or zones * nodes_per_zone > MAX_NODES:
        raise ValueError(f"nodes per zone must be at least 1 and at most {MAX_NODES} nodes in all")
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    plan = AddressPlan(net_id)
    region = "eu-west-1" if style == "eks" else "europe-west1"
    nodes = []
    # Unique per address plan, so two users of the topology never share a node name (and its pins).
    pool = hashlib.sha256(f"{prefix}/{net_id}".encode()).hexdigest()[:8]
    for z in range(zones):
        zone = f"{region}{chr(ord('a') + z)}" if style == "eks" else f"{region}-{chr(ord('a') + z)}"
        for k in range(nodes_per_zone):
            index = z * nodes_per_zone + k
            v4 = plan.node(index, 4)
            name, provider_id, instance_type = _node_identity(style, zone, v4, pool=pool, index=index)
            nodes.append(NodeSpec(
                index=index, name=name, netns=f"{prefix}-n{index}", zone=zone, zone_index=z, region=region,
                provider_id=provider_id, instance_type=instance_type, v4=v4, v6=plan.node(index, 6)))
    return Cluster(prefix=prefix, plan=plan, region=region, nodes=nodes)
