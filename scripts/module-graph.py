"""The import graph of a crate's modules (default engine/src): `use crate::…`, `super::…`, and
names re-exported by lib.rs; comments and test modules are ignored. Prints the cycles (and the
graph with -g) and exits 1 when there is one: docs/architecture.md states the graph has none."""
import re,os,sys
root=sys.argv[sys.argv.index('--root')+1] if '--root' in sys.argv else 'engine/src'
mods={}
for dp,dn,fn in os.walk(root):
    for f in fn:
        if not f.endswith('.rs'): continue
        p=os.path.join(dp,f)
        rel=os.path.relpath(p,root)[:-3]
        parts=rel.split('/')
        if parts[-1]=='mod': parts=parts[:-1]
        name='lib' if parts==['lib'] else '::'.join(parts)
        mods[name]=open(p).read()
def clean(s):
    i=s.find('#[cfg(test)]\nmod tests')
    if i>=0: s=s[:i]
    s=re.sub(r'//[^\n]*','',s)
    return s
# names re-exported at the crate root
reexp={}
for m in re.finditer(r'pub use ([a-z_:]+)::\{([^}]*)\};|pub use ([a-z_:]+)::([A-Za-z_]+);',clean(mods['lib'])):
    if m.group(1):
        for n in m.group(2).split(','):
            n=n.strip().split(' as ')[-1].strip()
            if n: reexp[n]=m.group(1).split('::')[0]
    else:
        reexp[m.group(4)]=m.group(3).split('::')[0]
edges={m:set() for m in mods}
def add(m,ref):
    parts=ref.split('::')
    if parts[0] in reexp and parts[0] not in mods:
        tgt=reexp[parts[0]]
    else:
        cand='::'.join(parts[:2])
        tgt=cand if cand in mods else parts[0]
    if tgt in mods and tgt!=m and not m.startswith(tgt+'::'):
        edges[m].add(tgt)
for m,s in mods.items():
    s=clean(s)
    for ref in re.findall(r'crate::([A-Za-z_]+(?:::[a-z_]+)?)',s):
        add(m,ref)
    for grp in re.findall(r'crate::\{([^}]*)\}',s):
        for item in grp.split(','):
            item=item.strip()
            if item: add(m,item.split('::')[0] if '::' not in item else item)
    base=m.rsplit('::',1)[0] if '::' in m else None
    for ref in re.findall(r'super::([a-z_]+)',s):
        if base:
            tgt=base+'::'+ref
            if tgt in mods and tgt!=m: edges[m].add(tgt)
for m in edges: edges[m].discard('lib')
sys.setrecursionlimit(10000)
color={};cycles=[]
def dfs(u,stack):
    color[u]=1; stack.append(u)
    for v in sorted(edges[u]):
        if color.get(v)==1: cycles.append(stack[stack.index(v):]+[v])
        elif color.get(v) is None: dfs(v,stack)
    stack.pop(); color[u]=2
for m in sorted(mods):
    if color.get(m) is None: dfs(m,[])
if '-g' in sys.argv:
    for m in sorted(edges): print(f"{m} -> {', '.join(sorted(edges[m]))}")
print("cycles:",cycles if cycles else "none")
sys.exit(1 if cycles else 0)
