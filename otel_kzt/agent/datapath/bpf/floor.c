/* The benchmarks' floor: the cheapest useful program, one per-CPU counter increment, of any mode's type.
 * bench/datapath.py and bench/datapath_overhead.py attach it at the same hook as the flow program and
 * compare run_time_ns/run_cnt. KZT_FLOOR_RETURN: what lets the packet on at that hook (netfilter
 * NF_ACCEPT 1, tcx TCX_NEXT -1, cgroup allow 1).
 */
#ifndef KZT_FLOOR_RETURN
#define KZT_FLOOR_RETURN 1
#endif

BPF_PERCPU_ARRAY(floor_count, u64, 1);

int kzt_floor(void *ctx)
{
    u32 zero = 0;
    u64 *n = floor_count.lookup(&zero);
    if (n)
        *n += 1;
    return KZT_FLOOR_RETURN;
}
