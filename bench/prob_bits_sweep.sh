#!/bin/sh
# On the GPU bench machine (after `. bench/device_setup.sh`): the temporal pair at 14, 13
# and 12 rANS probability bits, twice in turn; one JSON line each (bench/NOTES.md).
for round in 1 2; do
    for bits in 14 13 12; do
        python3 bench/temporal_pair.py --prob-bits "$bits" 2>/dev/null | python3 -c "
import json, sys
d = json.load(sys.stdin)
kern = lambda side, name: d[side]['top'].get(name, [0, None])[1]
print(json.dumps({'bits': d['prob_bits'], 'ratio': [d['ratio_key'], d['ratio_delta']],
                  'pair': [d['pair_key_ms'], d['pair_delta_ms']],
                  'decode_kernel': [kern('key_decode', '_decode_kernel'), kern('delta_decode', '_decode_kernel')],
                  'decode_tables': [kern('key_decode', '_decode_tables_kernel'), kern('delta_decode', '_decode_tables_kernel')],
                  'encode_kernel': [kern('key_encode', '_encode_kernel'), kern('delta_encode', '_encode_kernel')]}))"
    done
done
