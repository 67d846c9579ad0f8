# memory and speed of the CIFAR-10 loop at global batch 256 (cifar10_90min's), one epoch of a 5,000-image subset
cd /work/main
for variant in "base:" "accum2:--accum-steps 2" "accum4:--accum-steps 4" "ckpt:--grad-checkpointing" "nomallopt:"; do
  name=${variant%%:*}; extra=${variant#*:}
  envs=""; [ "$name" = nomallopt ] && envs="CONVMIXER_NO_MALLOPT=1"
  env $envs /usr/bin/time -f "%M KB max RSS" .venv/bin/python -m convmixer train --config cifar10_90min --data-dir ../shared/data \
    --time-limit 0 --epochs 1 --subset 5000 --val-max 1000 --no-progress --overwrite --out /tmp/mem/$name $extra > /tmp/mem/$name.log 2>&1
  echo "$name $(tail -1 /tmp/mem/$name.log) $(python3 -c "import json; r=[json.loads(l) for l in open('/tmp/mem/$name/metrics.jsonl')][-1]; print(round(r['images_per_second'],1), round(r['rss_mib']))")"
done
