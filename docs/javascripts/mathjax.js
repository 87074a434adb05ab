// MathJax 3 configuration for the whole site.
//
// Markdown pages: pymdownx.arithmatex (generic mode) turns $...$ and $$...$$ into \( \) and
// \[ \] inside elements of class "arithmatex".
// Executed tutorials: their Markdown cells keep the notebook's $...$ and $$...$$, nested in
// paragraphs and lists, so the page is scanned as a whole (MathJax skips code, pre and the
// like by itself); code cells (with their outputs) and the site's chrome are left alone.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: "tex2jax_ignore|mathjax_ignore|jp-CodeCell|md-header|md-nav|md-footer|md-search",
    processHtmlClass: "tex2jax_process|mathjax_process|arithmatex",
  },
};

// Material can swap pages without a reload; typeset each new page.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && MathJax.typesetPromise) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
