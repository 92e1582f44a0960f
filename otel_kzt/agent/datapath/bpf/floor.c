/* The benchmark's floor: the cheapest useful netfilter program, one per-CPU counter increment.
 * bench/datapath.py attaches it at the same hook as the flow program and compares run_time_ns/run_cnt.
 */
BPF_PERCPU_ARRAY(floor_count, u64, 1);

int kzt_floor(void *ctx)
{
    u32 zero = 0;
    u64 *n = floor_count.lookup(&zero);
    if (n)
        *n += 1;
    return 1;  /* NF_ACCEPT */
}
