// AudioWorklet of the live demo: resamples its two inputs (0: the user's microphone, 1: the
// avatar's own voice) from the context's rate to the model's (16 kHz) and posts them in chunks
// of `chunk` samples. Both inputs run on the same audio clock, so their chunks stay aligned.

// Windowed-sinc resampler for any rate ratio (48 kHz -> 16 kHz, 44.1 kHz -> 16 kHz, ...):
// low-pass at 90% of the lower Nyquist, Hann window, half-width 8 output periods.
class Resampler {
  constructor(ratio) {
    this.ratio = ratio;                               // input samples per output sample
    this.fc = 0.45 * Math.min(1, 1 / ratio);          // cutoff, cycles per input sample
    this.half = Math.ceil(8 * Math.max(1, ratio));    // kernel half-width, input samples
    // `half` zeros first, so output 0 sits on input 0 with a full (silent) past.
    this.buf = new Float32Array(4096);
    this.len = this.half;
    this.pos = this.half;                             // next output, in buffer coordinates
  }

  push(x, out) {
    if (this.len + x.length > this.buf.length) {
      const grown = new Float32Array(2 * (this.len + x.length));
      grown.set(this.buf.subarray(0, this.len));
      this.buf = grown;
    }
    this.buf.set(x, this.len);
    this.len += x.length;
    const { buf, half, fc } = this;
    while (this.pos + half < this.len) {
      const p = this.pos;
      let acc = 0, norm = 0;
      for (let k = Math.ceil(p - half); k <= Math.floor(p + half); k++) {
        const d = k - p;
        const a = 2 * Math.PI * fc * d;
        const w = (d === 0 ? 1 : Math.sin(a) / a) * (0.5 + 0.5 * Math.cos(Math.PI * d / (half + 1)));
        acc += w * buf[k];
        norm += w;
      }
      out.push(acc / norm);                           // unit gain at DC
      this.pos += this.ratio;
    }
    // Keep only the past the next output still needs.
    const drop = Math.floor(this.pos - half) - 1;
    if (drop > 0) {
      buf.copyWithin(0, drop, this.len);
      this.len -= drop;
      this.pos -= drop;
    }
  }
}

class Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate, chunk } = options.processorOptions;
    this.chunk = chunk;
    this.streams = [new Resampler(sampleRate / targetRate), new Resampler(sampleRate / targetRate)];
    this.pending = [[], []];
    this.silence = new Float32Array(128);
    this.port.onmessage = (e) => { if (e.data === 'stop') this.stopped = true; };
  }

  process(inputs) {
    for (let i = 0; i < 2; i++) {
      const channels = inputs[i] || [];
      let mono = this.silence;                        // an unconnected input is silence
      if (channels.length) {
        mono = new Float32Array(channels[0].length);
        for (const c of channels) for (let j = 0; j < c.length; j++) mono[j] += c[j] / channels.length;
      }
      this.streams[i].push(mono, this.pending[i]);
    }
    while (this.pending[0].length >= this.chunk && this.pending[1].length >= this.chunk) {
      // One message: the avatar's own voice, then the user's (the server's layout).
      const both = new Float32Array(2 * this.chunk);
      both.set(this.pending[1].splice(0, this.chunk), 0);
      both.set(this.pending[0].splice(0, this.chunk), this.chunk);
      this.port.postMessage({ audio: both }, [both.buffer]);
    }
    return !this.stopped;
  }
}

registerProcessor('capture', Capture);
