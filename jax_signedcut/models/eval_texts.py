"""Hand-written English texts for checking a compressed sentence encoder.

* ``SENTENCES``: 50 sentences of mixed topics, lengths and styles (embedding cosine).
* ``QUERIES`` / ``DOCUMENTS``: 20 questions and 30 short passages; ``ANSWERS[i]``
  is the index of the passage that answers ``QUERIES[i]``; passages 20–29 are
  near-miss distractors on the same topics (retrieval top-1 agreement).

Written for this project (no data set is downloaded).
"""

SENTENCES = (
    "The cat sat quietly on the windowsill, watching the rain.",
    "Interest rates rose for the third time this year.",
    "Please remember to water the tomatoes before you leave.",
    "A neutron star can spin hundreds of times per second.",
    "He scored twice in the second half and won the match.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our flight was delayed by four hours because of fog.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "The museum reopens on Monday after a long renovation.",
    "I can't find my keys anywhere!",
    "Matrix multiplication is associative but not commutative.",
    "The orchestra tuned up while the audience found their seats.",
    "She learned to play the violin when she was six.",
    "Heavy snow closed the mountain pass overnight.",
    "The new phone has a larger battery and a brighter screen.",
    "Voters will choose a new mayor in November.",
    "Bake the bread until the crust sounds hollow when tapped.",
    "The river flooded the lower part of the village.",
    "Compilers translate source code into machine instructions.",
    "My grandmother tells the best stories about her childhood.",
    "The stock market fell sharply after the announcement.",
    "Whales communicate with songs that travel for miles underwater.",
    "He apologised for being late to the meeting.",
    "The hiking trail winds through pine forests and meadows.",
    "A balanced diet includes vegetables, fruit and whole grains.",
    "The detective noticed a muddy footprint near the door.",
    "Solar panels on the roof cover most of the house's electricity.",
    "The children built a sandcastle with a moat and towers.",
    "Antibiotics do not work against viral infections.",
    "The committee postponed its decision until next week.",
    "Gradient descent updates the weights in the direction of steepest descent.",
    "The bakery on the corner sells fresh croissants every morning.",
    "Thunder rolled across the valley as the storm approached.",
    "She finished the marathon in just under four hours.",
    "The library extended its opening hours during exams.",
    "Quantum computers use qubits that can be in superposition.",
    "The old bridge was replaced by a modern steel structure.",
    "Don't forget your umbrella; it's going to pour later.",
    "The painter mixed blue and yellow to get a soft green.",
    "Tax returns are due at the end of April.",
    "The puppy chewed through the charging cable again.",
    "Ancient Romans built aqueducts to carry water into cities.",
    "Turn left at the second traffic light, then go straight.",
    "The vaccine trial enrolled thirty thousand volunteers.",
    "Coffee prices climbed after a poor harvest in Brazil.",
    "He fixed the leaking tap with a new rubber washer.",
    "The telescope captured images of a distant galaxy.",
    "Learning a second language takes patience and practice.",
    "The team released a bug fix for the login page.",
    "wow, what a game!!! can't believe that last-minute goal",
)

QUERIES = (
    "How do I make bread rise properly?",
    "What causes the seasons on Earth?",
    "Which programming language should a beginner learn?",
    "How can I lower my electricity bill?",
    "What is the capital of Australia?",
    "How do vaccines train the immune system?",
    "Why is the sky blue?",
    "How often should I water a cactus?",
    "What is a black hole?",
    "How do I change a flat tyre?",
    "What are the health benefits of regular exercise?",
    "How does a bank loan's interest work?",
    "Who painted the Mona Lisa?",
    "How do noise-cancelling headphones work?",
    "What do pandas eat?",
    "How can I improve my sleep?",
    "What is inflation?",
    "How do airplanes stay in the air?",
    "What is the boiling point of water at high altitude?",
    "How do I remove a red wine stain from a carpet?",
)

DOCUMENTS = (
    "Yeast ferments sugars and releases carbon dioxide; knead the dough well and let it "
    "proof somewhere warm until it doubles in size.",
    "Earth's axis is tilted about 23 degrees, so each hemisphere receives more direct "
    "sunlight for part of the year, giving summer and winter.",
    "Python is often recommended to newcomers because its syntax is readable and it has "
    "a huge number of tutorials.",
    "Switching to LED bulbs, insulating the attic and unplugging idle devices cut household "
    "power consumption.",
    "Canberra, not Sydney, is the seat of the Australian federal government.",
    "A vaccine exposes the body to a harmless piece of a pathogen so that it produces "
    "antibodies and memory cells.",
    "Sunlight is scattered by air molecules, and shorter blue wavelengths scatter the most "
    "(Rayleigh scattering).",
    "Succulents such as cacti store water; in summer water them every two to three weeks "
    "and far less in winter.",
    "When a massive star collapses, its gravity can become so strong that not even light "
    "escapes from the region.",
    "Loosen the wheel nuts, jack up the car, swap in the spare wheel and tighten the nuts "
    "in a star pattern.",
    "Physical activity strengthens the heart, helps control weight and improves mood and "
    "sleep.",
    "A loan charges a percentage of the outstanding balance each period; compound interest "
    "adds unpaid interest to the principal.",
    "Leonardo da Vinci worked on the portrait of Lisa Gherardini in the early 1500s; it "
    "hangs in the Louvre.",
    "Microphones pick up ambient sound and the headphones play an inverted wave that "
    "cancels it.",
    "Giant pandas feed almost entirely on bamboo, eating up to 38 kilograms a day.",
    "Keep a regular bedtime, avoid screens and caffeine in the evening and keep the bedroom "
    "cool and dark.",
    "Inflation is the general rise in prices over time, which reduces the purchasing power "
    "of money.",
    "Wings are shaped so that air flowing over them produces lift that balances the weight "
    "of the aircraft.",
    "Air pressure drops with altitude, so water boils at a lower temperature in the "
    "mountains, around 90 °C at 3000 m.",
    "Blot the spill, cover it with salt or baking soda, then dab with cold water and a "
    "little dish soap.",
    "Sourdough uses a starter culture of wild yeast and lactic acid bacteria instead of "
    "commercial yeast.",
    "The Moon's phases come from the changing angle between the Sun, the Earth and the Moon.",
    "Rust guarantees memory safety without a garbage collector through its ownership rules.",
    "Electric cars are charged at home or at public fast-charging stations.",
    "Sydney is Australia's largest city and is famous for its harbour and opera house.",
    "Antibiotics kill bacteria or stop them from growing.",
    "Neutron stars are the dense remnants of supernova explosions.",
    "Vincent van Gogh painted The Starry Night while staying at an asylum in Saint-Rémy.",
    "Koalas live in eucalyptus forests and sleep up to twenty hours a day.",
    "Most coffee stains come out with a mixture of vinegar, dish soap and warm water.",
)

ANSWERS = tuple(range(20))
