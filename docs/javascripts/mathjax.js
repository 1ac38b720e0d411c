// MathJax settings for pymdownx.arithmatex (generic mode): $...$ inline, $$...$$ display.
// MathJax itself is served with the site (javascripts/mathjax/tex-svg-full.js, `make docs`):
// SVG output needs no web fonts, so pages render offline and from file:// alike.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex|md-nav__link|md-ellipsis"   // math in the table of contents too
  },
  svg: {
    fontCache: "global"
  }
};

// Material's instant navigation swaps pages without a reload: typeset each new page.
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
