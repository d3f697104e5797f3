"""The HTML report's inline style sheet and script (no network: both are in the page).

The script sorts a leaderboard by a clicked header; filters rows by model, method family,
execution and task while each model's baseline row stays in view (the reference every Δ is
taken against); shows or hides the plots of the filtered models and tasks, lists each plot's
points by the same filters, and says so where a filter (family, execution) cannot redraw a plot;
and keeps the model and method columns in view when the table scrolls sideways.
"""

CSS = """
[hidden]{display:none!important}
body{font:14px/1.45 system-ui,-apple-system,sans-serif;margin:0 auto;max-width:1500px;padding:0 18px 60px;
  color:#1d1d1f;overflow-wrap:anywhere}
h1{margin:18px 0 4px}
h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:34px}
.meta{color:#555}
.box{background:#fff7e6;border:1px solid #f0c36d;padding:8px 12px;border-radius:6px;margin:10px 0}
.filters{display:flex;flex-wrap:wrap;gap:12px;align-items:center;background:#f4f6f8;padding:8px 10px;
  border-radius:6px;position:sticky;top:0;z-index:4}
.filters label{font-size:13px}
.wrap{overflow-x:auto;max-width:100%}
table{border-collapse:separate;border-spacing:0;margin:6px 0 14px;font-size:13px}
th,td{border:1px solid #d9dde1;border-width:0 1px 1px 0;padding:3px 7px;vertical-align:top;background:#fff}
tr > :first-child{border-left-width:1px}
thead th,table.protocol th,table.plain th{border-top-width:1px}
td.nw{white-space:nowrap}
td.method{min-width:130px;max-width:240px}
td.text{min-width:220px;font-size:12px}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.lb th{background:#eef1f4;cursor:pointer;user-select:none;position:relative;padding-right:16px;
  overflow-wrap:normal;min-width:3.5em;font-size:12px}
table.lb td.noise{min-width:120px;max-width:190px}
table.lb td.flags{font-size:12px;white-space:nowrap}
span.sig{font-weight:600}
table.lb td.text{min-width:140px;max-width:260px}
table.lb th[aria-sort=ascending]::after{content:"▲";position:absolute;right:3px;font-size:9px}
table.lb th[aria-sort=descending]::after{content:"▼";position:absolute;right:3px;font-size:9px}
table.lb th:nth-child(1),table.lb td:nth-child(1){position:sticky;left:0;z-index:2}
table.lb th:nth-child(2),table.lb td:nth-child(2){position:sticky;left:var(--second,140px);z-index:2;
  box-shadow:3px 0 3px -2px rgba(0,0,0,.25)}
table.lb td:nth-child(1){max-width:200px}
table.lb:not(.all) .extra{display:none}
.taskhidden{display:none}
tr.baseline td{background:#f4f4f4;font-weight:600}
tr.sim td.method{border-left:3px dashed #c0392b}
tr.native td.method{border-left:3px solid #2471a3}
.badge{display:inline-block;border-radius:9px;padding:0 7px;font-size:12px;white-space:nowrap;overflow-wrap:normal}
.badge.native{background:#2471a3;color:#fff}
.badge.simulated{border:1.5px dashed #c0392b;color:#c0392b}
.badge.flagged{background:#e8e8e8;color:#444;border:1px dotted #777}
.warn{color:#a04000}
td.flagged{background:#f1f1f1;color:#666}
span.flag{display:block;width:fit-content;margin-left:auto;font-size:10px;color:#555;border:1px dotted #777;
  border-radius:6px;padding:0 4px}
span.note{display:block;font-size:10px;color:#555;white-space:normal}
span.ctl{font:10px monospace;background:#ffe0e0;color:#900;border:1px solid #c66;border-radius:3px;padding:0 2px}
figure{display:inline-block;margin:8px 12px 18px 0;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto}
figure.greyed img{filter:grayscale(1);opacity:.8}
figure .banner{background:#eee;border:1px solid #bbb;color:#333;padding:4px 8px;border-radius:4px;margin:0 0 4px;
  font-size:13px;max-width:620px}
figure details{font-size:12px;max-width:630px}
figure details li[hidden]{display:none}
.plotnote{display:none}
.plotnote.on{display:block}
details.cell{border:1px solid #ddd;border-radius:6px;margin:6px 0;padding:4px 10px}
details.cell[open]{background:#fbfbfd}
summary{cursor:pointer}
pre{background:#f4f4f6;padding:6px 8px;overflow-x:auto;font-size:12px;max-height:360px;white-space:pre-wrap}
.legend span{margin-right:14px}
"""

# Sort a table by a clicked header: numbers by value (data-v), text by text, empty cells last
# (both pages use it).
SORT_JS = """
function slimSortBy(th){
  function key(td){
    if(!td) return [2,''];
    var v=td.getAttribute('data-v');
    if(v!==null && v!=='') return [0,parseFloat(v)];
    var t=td.textContent.trim();
    return (t===''||t==='\\u2013') ? [2,''] : [1,t.toLowerCase()];
  }
  var table=th.closest('table'), idx=Array.prototype.indexOf.call(th.parentNode.children,th);
  var asc=th.getAttribute('aria-sort')!=='ascending';
  table.querySelectorAll('th').forEach(function(x){x.removeAttribute('aria-sort');});
  th.setAttribute('aria-sort',asc?'ascending':'descending');
  var tb=table.tBodies[0], rows=Array.prototype.slice.call(tb.rows);
  rows.sort(function(a,b){
    var ka=key(a.cells[idx]), kb=key(b.cells[idx]);
    if(ka[0]!==kb[0]) return ka[0]===2?1:(kb[0]===2?-1:ka[0]-kb[0]);
    var c=ka[1]<kb[1]?-1:(ka[1]>kb[1]?1:0);
    return asc?c:-c;
  });
  rows.forEach(function(r){tb.appendChild(r);});
}
"""

JS = SORT_JS + """
(function(){
  document.querySelectorAll('table.lb th').forEach(function(th){
    th.addEventListener('click',function(){slimSortBy(th);});
  });
  function sticky(){
    document.querySelectorAll('table.lb').forEach(function(t){
      var first=t.tHead && t.tHead.rows[0] && t.tHead.rows[0].cells[0];
      if(first) t.style.setProperty('--second', first.offsetWidth+'px');
    });
  }
  var selects=document.querySelectorAll('select[data-filter]');
  function passes(el,f,skip){
    return Object.keys(f).every(function(k){
      if(skip && skip.indexOf(k)>=0) return true;
      var have=JSON.parse(el.getAttribute('data-'+k)||'[]');
      return have.indexOf(f[k])>=0;
    });
  }
  function apply(){
    var f={};
    selects.forEach(function(s){ if(s.value) f[s.getAttribute('data-filter')]=s.value; });
    var shown=0;
    document.querySelectorAll('table.lb tbody tr').forEach(function(tr){
      // a model's baseline stays in view under every filter but the model filter: it is the reference
      var ok=tr.classList.contains('baseline') ? passes(tr,f,['family','execution','task']) : passes(tr,f);
      tr.hidden=!ok; if(ok) shown++;
    });
    document.querySelectorAll('table.lb [data-task]').forEach(function(c){
      c.classList.toggle('taskhidden', !!f.task && c.getAttribute('data-task')!==f.task);
    });
    document.querySelectorAll('figure[data-model]').forEach(function(fig){
      fig.hidden=!passes(fig,f,['family','execution']);
    });
    document.querySelectorAll('figure li[data-model]').forEach(function(li){ li.hidden=!passes(li,f,['task']); });
    var note=document.getElementById('plotnote');
    if(note){
      var partial=['family','execution'].filter(function(k){return !!f[k];});
      note.classList.toggle('on', partial.length>0);
      var what=document.getElementById('plotnote-what'); if(what) what.textContent=partial.join(' and ');
    }
    var n=document.getElementById('shown'); if(n) n.textContent=String(shown);
  }
  selects.forEach(function(s){ s.addEventListener('change',apply); });
  var all=document.getElementById('allcols');
  if(all) all.addEventListener('change',function(){
    document.querySelectorAll('table.lb').forEach(function(t){t.classList.toggle('all',all.checked);});
    sticky();
  });
  function openHash(){
    var id=decodeURIComponent(location.hash.slice(1)); if(!id) return;
    var el=document.getElementById(id); if(el && el.tagName==='DETAILS') el.open=true;
  }
  window.addEventListener('hashchange',openHash); openHash();
  window.addEventListener('resize',sticky);
  sticky();
  apply();
})();
"""

# compare.html: sort by a clicked header (numbers by value, empty last), filter by text and verdict.
COMPARE_JS = SORT_JS + """
(function(){
  var table=document.getElementById('cmp'); if(!table) return;
  table.querySelectorAll('th').forEach(function(th){
    th.addEventListener('click',function(){slimSortBy(th);});
  });
  var q=document.getElementById('q'), verdict=document.getElementById('verdict');
  function apply(){
    var text=(q.value||'').toLowerCase(), v=verdict.value, shown=0;
    Array.prototype.forEach.call(table.tBodies[0].rows,function(tr){
      var ok=(!text || tr.textContent.toLowerCase().indexOf(text)>=0) && (!v || tr.getAttribute('data-verdict')===v);
      tr.hidden=!ok; if(ok) shown++;
    });
    document.getElementById('shown').textContent=String(shown);
  }
  q.addEventListener('input',apply); verdict.addEventListener('change',apply); apply();
})();
"""
